"""ATS (Fayyaz et al. 2022): significance scores and deduplicated inverse transform sampling against a loop-by-loop
reading of the released algorithm, the catalog's Tier-0 checks on toy scores (each token at most once, CLS
first, high-score tokens always kept), the masked fixed capacity, gradients, and ATS inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_cases import check_in_vit, jit_run, probabilities, random_case

from effjax.tokens import ats


def naive_ats(cls_attention, values, keep, prefix, targets):
    """One example in float64: the kept positions (prefix first, then sampled ones ascending)."""
    n = values.shape[0]
    score = cls_attention.sum(0) * np.sqrt((values ** 2).sum(axis=(1, 2)))
    score[:prefix] = 0.0
    score = score / score.sum()
    order = np.argsort(score, kind="stable")
    cdf = np.cumsum(score[order])
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    start = min(c for c in cdf if c > 0)
    picked = set()
    for t in range(targets):
        y = start + (1.0 - start) * t / max(targets - 1, 1)
        best = min(range(n), key=lambda i, y=y: (abs(y - cdf[i]), i))  # nearest, the first on a tie
        picked.add(int(order[best]))
    picked = [i for i in picked if score[i] > 0]
    picked = sorted(picked, key=lambda i: -score[i])[:keep - prefix]  # the capacity keeps the best
    return list(range(prefix)) + sorted(picked), score


def test_sampling_equals_the_released_algorithm_run_as_loops():
    x, qkv, tokens = random_case(0, n=24)
    q, k, v = qkv
    cls = probabilities(q, k)[:, :, 0]
    for prefix, keep, targets in ((1, 12, 23), (2, 6, 22), (1, 16, None)):
        out, new = jit_run("ats", x, qkv, tokens, keep, prefix, targets=targets)
        for b in range(2):
            kept, _ = naive_ats(cls[b], np.asarray(v[b], np.float64), keep, prefix, targets or 24 - prefix)
            count = len(kept)
            assert count <= keep
            np.testing.assert_array_equal(new.mask[b], np.arange(keep) < count)
            np.testing.assert_array_equal(out[b, :count], x[b, kept])
            np.testing.assert_array_equal(out[b, count:], 0.0)  # unused slots: zero features, size 0
            np.testing.assert_array_equal(new.sizes[b, :count], tokens.sizes[b, kept])
            np.testing.assert_array_equal(new.sizes[b, count:], 0.0)
            want = np.full(24, -1)
            want[kept] = np.arange(count)
            np.testing.assert_array_equal(new.source[b], want)


def test_toy_scores_each_token_at_most_once_cls_first_and_high_scores_always_kept():
    scores = np.array([[0.0, 0.4, 0.01, 0.01, 0.2, 0.01, 0.01, 0.3, 0.02, 0.01, 0.02, 0.01],
                       [0.0] + [1 / 11] * 11])
    scores = jnp.asarray(scores / scores.sum(1, keepdims=True), jnp.float32)
    index, valid = ats.select(scores, 10, 1, targets=11)
    index, valid = np.asarray(index), np.asarray(valid)
    for b in range(2):
        used = index[b][valid[b]]
        assert used[0] == 0 and len(set(used.tolist())) == len(used)  # CLS first, no token twice
        assert list(used[1:]) == sorted(used[1:])
    assert {1, 4, 7} <= set(index[0][valid[0]].tolist())  # the three high scores
    assert valid[0].sum() < valid[1].sum()  # peaked scores keep fewer tokens than flat ones: the count adapts
    assert valid[1].sum() == 10  # flat scores fill the capacity
    hit = np.asarray(ats.sample(scores, 11))
    assert hit[0, [1, 4, 7]].all() and not hit[0, 0]


def test_significance_is_cls_attention_times_the_value_norm_over_patches():
    _, (q, k, v), tokens = random_case(1, n=10)
    cls = probabilities(q, k)[:, :, 0]
    got = ats.significance(jnp.asarray(cls, jnp.float32), v, prefix=1)
    want = cls.sum(1) * np.sqrt((np.asarray(v, np.float64) ** 2).sum(axis=(2, 3)))
    want[:, 0] = 0.0
    np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), rtol=1e-5)


def test_gradients_are_finite():
    x, qkv, tokens = random_case(2)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    loss = lambda x: jnp.sum(jit_run("ats", x, qkv, tokens, 9, 1)[0] * direction)
    grad = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_ats_inside_a_vit_masks_the_slots_it_does_not_fill():
    *_, inter = check_in_vit("ats", needs_probabilities=True)
    sizes = np.asarray(inter["token_sizes"][0])
    assert sizes.shape == (2, 13) and np.all(sizes[:, 0] == 1) and np.all(sizes.sum(1) <= 17)

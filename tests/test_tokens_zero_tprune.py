"""Zero-TPrune (Wang et al. 2024): the I-stage weighted PageRank against numpy power iteration, the S-stage
similarity pruning against a loop-by-loop reading of the rule in the module docstring, gradients, and Zero-TPrune
inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_cases import check_in_vit, jit_run, probabilities, random_case

from effjax.tokens import zero_tprune


def power_iteration(a, iterations, real):
    """float64: ``s <- A_h^T s`` per head from the uniform distribution over real tokens, then the head mean."""
    scores = []
    for head in a:
        s = real / real.sum()
        for _ in range(iterations):
            s = head.T @ s
        scores.append(s)
    return np.mean(scores, axis=0)


def masked_probabilities(q, k, mask):
    p = probabilities(q, k)
    if mask is not None:
        p = p * np.asarray(mask)[:, None, None, :]
        p = p / p.sum(-1, keepdims=True)
    return p


def test_pagerank_equals_numpy_power_iteration():
    _, (q, k, _), tokens = random_case(0, n=12, padded=3)
    for mask in (None, tokens.mask):
        p = masked_probabilities(q, k, mask)
        real = np.ones((2, 12)) if mask is None else np.asarray(mask, np.float64)
        for iterations in (1, 5, 30):
            got = zero_tprune.pagerank(jnp.asarray(p, jnp.float32), iterations, mask)
            for b in range(2):
                np.testing.assert_allclose(got[b], power_iteration(p[b], iterations, real[b]), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    # Many iterations reach each head's stationary distribution: s = A^T s.
    s = np.asarray(zero_tprune.pagerank(jnp.asarray(p[:, :1], jnp.float32), 200))
    np.testing.assert_allclose(np.einsum("bq,bqk->bk", s, p[:, 0]), s, atol=1e-5)


def naive_zero_tprune(p, keys, keep, prefix, iterations, group):
    """One example: the kept positions."""
    n = len(keys)
    importance = power_iteration(p, iterations, np.ones(n))
    others = sorted(range(prefix, n), key=lambda i: importance[i])  # least important first
    removed = n - keep
    size = min(len(others), max(removed, int(round(group * len(others)))))
    less, more = others[:size], others[size:]
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    redundancy = {i: max(float(unit[i] @ unit[j]) for j in more) if more else -1.0 for i in less}
    if removed <= len(less):
        pruned = sorted(less, key=lambda i: -redundancy[i])[:removed]
    else:
        pruned = less + more[:removed - len(less)]
    return sorted(set(range(n)) - set(pruned))


def test_pruning_equals_the_rule_run_as_loops():
    x, qkv, tokens = random_case(1, n=20)
    q, k, _ = qkv
    p = probabilities(q, k)
    keys = np.asarray(k, np.float64).mean(2)
    for prefix, keep, group in ((1, 12, 0.5), (2, 6, 0.5), (1, 15, 0.8)):  # removals within, beyond the group
        out, new = jit_run("zero_tprune", x, qkv, tokens, keep, prefix, group=group)
        for b in range(2):
            kept = naive_zero_tprune(p[b], keys[b], keep, prefix, 30, group)
            assert kept[:prefix] == list(range(prefix))
            np.testing.assert_array_equal(out[b], x[b, kept])
            np.testing.assert_array_equal(new.sizes[b], tokens.sizes[b, kept])


def test_gradients_are_finite():
    x, qkv, tokens = random_case(2)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jit_run("zero_tprune", x, qkv, tokens, 9, 1)[0] * direction)))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_zero_tprune_inside_a_vit():
    *_, inter = check_in_vit("zero_tprune", needs_probabilities=True)
    np.testing.assert_array_equal(inter["token_sizes"][0], 1.0)  # pruning: the kept tokens keep size 1
    assert inter["token_sizes"][0].shape == (2, 13)

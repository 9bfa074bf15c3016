"""MCTF (Lee et al. 2024): the multi-criteria weights and the bidirectional bipartite matching against a
loop-by-loop reading of the paper's rule, attention x size pooling, gradients, and MCTF inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from token_cases import check_in_vit, jit_run, probabilities, random_case

from effjax.tokens import mctf


def naive_weights(x, received, sizes, tau_sim=1.0, tau_info=20.0, tau_size=40.0):
    n = len(x)
    info = 1.0 / received
    info = info / info.max()
    size = 1.0 / sizes
    size = size / size.max()
    w = np.zeros(((n + 1) // 2, n // 2))
    for ia, a in enumerate(range(0, n, 2)):
        for ib, b in enumerate(range(1, n, 2)):
            cos = x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b])
            w[ia, ib] = (((cos + 1) / 2) ** (1 / tau_sim) * (info[a] * info[b]) ** (1 / tau_info)
                         * (size[a] * size[b]) ** (1 / tau_size))
    return w


def naive_matching(w, r, prefix):
    """Groups of original positions per output slot."""
    n_a, n_b = w.shape
    a_pos, b_pos = list(range(0, 2 * n_a, 2)), list(range(1, 2 * n_b + 1, 2))
    r1, r2 = r // 2, r - r // 2
    best_b = {}
    for ia in range(n_a):
        if prefix >= 1 and ia == 0:
            continue
        cols = [ib for ib in range(n_b) if not (prefix >= 2 and ib == 0)]
        ib = max(cols, key=lambda j, ia=ia: (w[ia, j], -j))
        best_b[ia] = (w[ia, ib], ib)
    a_src = sorted(best_b, key=lambda ia: -best_b[ia][0])[:r1]  # stable: ties keep index order
    a_left = [ia for ia in range(n_a) if ia not in a_src]
    best_a = {}
    for ib in range(n_b):
        if prefix >= 2 and ib == 0:
            continue
        rows = [ia for ia in a_left if not (prefix >= 1 and ia == 0)]
        ia = max(rows, key=lambda i, ib=ib: (w[i, ib], -i))
        best_a[ib] = (w[ia, ib], ia)
    b_src = sorted(best_a, key=lambda ib: -best_a[ib][0])[:r2]
    b_left = [ib for ib in range(n_b) if ib not in b_src]
    b_group = {ib: [b_pos[ib]] + [a_pos[ia] for ia in a_src if best_b[ia][1] == ib] for ib in range(n_b)}
    a_group = {ia: [a_pos[ia]] + sum((b_group[ib] for ib in b_src if best_a[ib][1] == ia), []) for ia in a_left}
    groups = [a_group[ia] for ia in a_left] + [b_group[ib] for ib in b_left]
    if prefix >= 2:  # [A_0, B_0, A_1:, B_1:]
        k = len(a_left)
        groups = [groups[0], groups[k]] + groups[1:k] + groups[k + 1:]
    return groups


def test_weights_equal_the_three_criteria():
    x, (q, k, _), tokens = random_case(0, n=11)
    received = probabilities(q, k).mean(axis=(1, 2))
    got = mctf.weights(x, jnp.asarray(received, jnp.float32), tokens.sizes)
    for b in range(2):
        want = naive_weights(np.asarray(x[b], np.float64), received[b], np.asarray(tokens.sizes[b], np.float64))
        np.testing.assert_allclose(got[b], want, rtol=1e-5)
    np.testing.assert_allclose(mctf.attention_received(jnp.asarray(probabilities(q, k), jnp.float32)), received,
                               rtol=1e-5)


@pytest.mark.parametrize("prefix,n,r", slow_after([(2, 16, 5), (1, 17, 6), (0, 15, 7), (1, 20, 1)]))
def test_bidirectional_matching_and_pooling_equal_the_rule_run_as_loops(prefix, n, r):
    x, qkv, tokens = random_case(n + r, n=n)
    q, k, _ = qkv
    received = probabilities(q, k).mean(axis=(1, 2))
    out, new = jit_run("mctf", x, qkv, tokens, n - r, prefix)
    for b in range(2):
        xb, sizes = np.asarray(x[b], np.float64), np.asarray(tokens.sizes[b], np.float64)
        groups = naive_matching(naive_weights(xb, received[b], sizes), r, prefix)
        assert len(groups) == n - r
        got = [sorted(np.flatnonzero(np.asarray(new.source[b]) == slot).tolist()) for slot in range(n - r)]
        assert got == [sorted(g) for g in groups]
        weight = received[b] * sizes
        pooled = np.stack([(weight[g, None] * xb[g]).sum(0) / weight[g].sum() for g in groups])
        np.testing.assert_allclose(out[b], pooled, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(new.sizes[b], [sizes[g].sum() for g in groups])


def test_r_is_capped_at_half_the_non_prefix_tokens():
    assert mctf.SPEC.max_removed(17, 1) == 8 and mctf.SPEC.max_removed(16, 2) == 7
    x, qkv, tokens = random_case(1, n=9)
    out, _ = mctf.merge(x, tokens, x, jnp.asarray(probabilities(*qkv[:2]), jnp.float32), 8, 1)
    assert out.shape[1] == 5


def test_gradients_are_finite():
    x, qkv, tokens = random_case(2)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jit_run("mctf", x, qkv, tokens, 9, 1)[0] * direction)))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_mctf_inside_a_vit():
    *_, inter = check_in_vit("mctf", needs_probabilities=True)
    np.testing.assert_array_equal(np.asarray(inter["token_sizes"][0]).sum(1), 17.0)

"""HoT (Li et al. 2024): DPC-kNN against a float64 loop reading of its formulas, one time-sorted centre per
well-separated toy cluster (catalog 17.2), the pruning Reducer, the recovering cross-attention, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_method_checks import assert_kept, assert_model, key, start

from effjax.tokens import hot


def naive_scores(f, k=2):
    n, c = f.shape
    d = np.array([[np.linalg.norm(f[i] - f[j]) / np.sqrt(c) for j in range(n)] for i in range(n)])
    density = np.array([np.exp(-np.mean(np.sort(d[i])[:k] ** 2)) for i in range(n)])
    delta = np.empty(n)
    for i in range(n):
        denser = [d[i, j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta[i] = min(denser) if denser else d.max()
    return density * delta, density, delta


def test_dpc_knn_scores_equal_the_formulas_as_loops():
    f = jax.random.normal(key(0), (2, 13, 6))
    score, density, delta = jax.jit(hot.dpc_knn_scores, static_argnums=1)(f, 2)
    for b in range(2):
        ref = naive_scores(np.asarray(f[b], np.float64))
        for got, want in zip((score, density, delta), ref, strict=True):
            np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)


def test_one_centre_per_well_separated_cluster_sorted_by_time():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0], [0, 0, 0, 10.0]])
    labels = rng.permutation(np.repeat(np.arange(4), 6))  # clusters interleaved in time
    frames = centres[labels] + 0.1 * rng.standard_normal((24, 4))
    index = np.asarray(hot.dpc_knn(jnp.asarray(frames[None], jnp.float32), 4)[0])
    assert sorted(labels[index].tolist()) == [0, 1, 2, 3]  # one centre per cluster
    assert np.all(np.diff(index) > 0)  # in time order
    mask = np.ones((1, 24), bool)
    mask[0, index[0]] = False  # a padded token is never a centre
    again = np.asarray(hot.dpc_knn(jnp.asarray(frames[None], jnp.float32), 4, mask=jnp.asarray(mask))[0])
    assert index[0] not in again and sorted(labels[again].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("prefix", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_reducer_keeps_the_centres_after_the_prefix_in_position_order(prefix):
    x, tokens = start(2, 19, seed=prefix)
    reducer = hot.Reducer()
    variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, keep=9, prefix=prefix))(key(1))
    out, new = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, keep=9, prefix=prefix))(variables, x, tokens)
    assert_kept(x, tokens, out, new, 9, prefix)
    assert variables["params"]["pos_embed"].shape == (9 - prefix, 8)
    expect = np.asarray(hot.dpc_knn(x[:, prefix:], 9 - prefix)) + prefix
    np.testing.assert_array_equal(out[:, prefix:], np.take_along_axis(np.asarray(x), expect[..., None], 1))
    same, kept = reducer.apply(variables, x, tokens, None, keep=19, prefix=prefix)
    assert same is x and kept is tokens


def test_recover_gives_full_length_tokens_uniform_at_init_and_trains_its_queries():
    x = jax.random.normal(key(2), (2, 5, 16))
    recover = hot.Recover(num_tokens=12, num_heads=2)
    variables = jax.jit(recover.init)(key(3), x)
    out = jax.jit(recover.apply)(variables, x)
    assert out.shape == (2, 12, 16)
    np.testing.assert_allclose(out, jnp.broadcast_to(out[:, :1], out.shape), rtol=1e-5, atol=1e-6)  # Q = 0
    target = jax.random.normal(key(4), (2, 12, 16))
    grads = jax.jit(jax.grad(lambda v: jnp.sum((recover.apply(v, x) - target) ** 2)))(variables)
    assert np.any(grads["params"]["queries"] != 0)
    mask = jnp.array([[True] * 5, [True, True, False, False, False]])
    hidden = recover.apply(variables, x.at[1, 2:].set(100.0), mask)  # masked tokens are not attended to
    np.testing.assert_allclose(hidden[1], recover.apply(variables, x[1:, :2])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # three compiles of a 4-layer ViT (init, training gradient, inference)
def test_a_vit_with_hot_trains_its_position_embeddings_and_runs_jitted():
    tokens = dict(method="hot", keep=0.7, layers="1,2")
    grads, _, sizes = assert_model(**tokens)
    assert set(grads) == {"tokens_1/pos_embed", "tokens_2/pos_embed"}
    assert sizes.shape == (2, 8)

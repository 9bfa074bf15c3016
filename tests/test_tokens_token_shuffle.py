"""Token-Shuffle (Ma et al. 2025): shuffle/unshuffle are exact inverses that fold s x s windows, the
ShuffleIn/ShuffleOut modules, the window-folding Reducer (mean at init, sizes s^2, source = window), gradients."""

import jax
import numpy as np
import pytest
from token_method_checks import assert_model, key, start

from effjax.tokens import recover, token_shuffle


@pytest.mark.parametrize("grid,s", [((4, 4), 2), ((6, 4), 2), ((6, 9), 3), ((4, 4), 1), ((8, 8), 4)])
def test_shuffle_folds_each_window_and_unshuffle_is_its_exact_inverse(grid, s):
    height, width = grid
    x = jax.random.normal(key(0), (2, height * width, 3))
    y = jax.jit(token_shuffle.shuffle, static_argnums=(1, 2))(x, grid, s)
    assert y.shape == (2, height * width // (s * s), s * s * 3)
    np.testing.assert_array_equal(token_shuffle.unshuffle(y, grid, s), x)
    np.testing.assert_array_equal(token_shuffle.shuffle(token_shuffle.unshuffle(y, grid, s), grid, s), y)
    image = np.asarray(x).reshape(2, height, width, 3)
    for j in range(y.shape[1]):
        r, c = divmod(j, width // s)
        window = image[:, r * s:(r + 1) * s, c * s:(c + 1) * s]  # rows, then columns, then channels
        np.testing.assert_array_equal(y[:, j], window.reshape(2, -1))
    blocks = np.arange(y.shape[1]).reshape(height // s, width // s)
    np.testing.assert_array_equal(token_shuffle.windows(grid, s), np.kron(blocks, np.ones((s, s), int)).reshape(-1))


def test_shuffle_refuses_grids_the_window_does_not_tile():
    x = jax.random.normal(key(0), (1, 15, 4))
    with pytest.raises(ValueError, match="grid has 16 tokens"):
        token_shuffle.shuffle(x, (4, 4), 2)
    with pytest.raises(ValueError, match="does not divide"):
        token_shuffle.shuffle(x, (5, 3), 2)


def test_shuffle_in_and_out_modules_change_the_length_by_s_squared():
    x = jax.random.normal(key(1), (2, 16, 8))
    into, out = token_shuffle.ShuffleIn((4, 4)), token_shuffle.ShuffleOut((4, 4))
    v_in = jax.jit(into.init)(key(2), x)
    short = jax.jit(into.apply)(v_in, x)
    assert short.shape == (2, 4, 8) and v_in["params"]["down"]["kernel"].shape == (8, 2)
    v_out = jax.jit(out.init)(key(3), short)
    full = jax.jit(out.apply)(v_out, short)
    assert full.shape == (2, 16, 8) and v_out["params"]["up"]["kernel"].shape == (2, 8)
    with pytest.raises(ValueError, match="not divisible by s"):
        token_shuffle.ShuffleIn((4, 4)).init(key(0), x[..., :6])


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_reducer_folds_windows_to_their_mean_at_init_with_sizes_and_source(prefix):
    x, tokens = start(2, prefix + 16, seed=prefix)
    reducer = token_shuffle.Reducer()
    variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, keep=prefix + 4, prefix=prefix))(key(1))
    out, new = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, keep=prefix + 4, prefix=prefix))(
        variables, x, tokens)
    assert out.shape == (2, prefix + 4, 8)
    np.testing.assert_array_equal(out[:, :prefix], x[:, :prefix])
    window = token_shuffle.windows((4, 4), 2)
    patches = np.asarray(x[:, prefix:])
    for j in range(4):
        np.testing.assert_allclose(out[:, prefix + j], patches[:, window == j].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.sizes, np.broadcast_to([1.0] * prefix + [4.0] * 4, (2, prefix + 4)))
    np.testing.assert_array_equal(new.source[1], np.concatenate([np.arange(prefix), window + prefix]))
    np.testing.assert_array_equal(recover(out, new.source)[:, prefix:], np.asarray(out)[:, prefix + window])
    with pytest.raises(ValueError, match="cannot become 5"):
        reducer.init(key(1), x, tokens, None, keep=prefix + 5, prefix=prefix)


@pytest.mark.slow  # three compiles of a 4-layer ViT (init, training gradient, inference)
def test_a_vit_with_token_shuffle_trains_its_folds_and_runs_jitted():
    tokens = dict(method="token_shuffle", keep=0.25, layers="1,2")  # 16 -> 4 -> 1 patches
    grads, _, sizes = assert_model(**tokens)
    assert set(grads) == {f"tokens_{i}/fold/{p}" for i in (1, 2) for p in ("kernel", "bias")}
    np.testing.assert_array_equal(sizes, [[1, 16], [1, 16]])

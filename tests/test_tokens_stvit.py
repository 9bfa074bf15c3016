"""STViT semantic tokens (Chang et al. 2023): the adaptive cells of the patch grid, max/avg pooling against
numpy, sizes and the source map (recover paints each cell), the refined Reducer, and gradients in a ViT."""

import jax
import numpy as np
import pytest
from token_method_checks import assert_model, key, start

from effjax.tokens import TokenState, recover, stvit


def test_cells_are_non_overlapping_adaptive_blocks_of_the_square_grid():
    np.testing.assert_array_equal(stvit.cells(16, 4).reshape(4, 4), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3],
                                                                     [2, 2, 3, 3]])
    np.testing.assert_array_equal(stvit.cells(16, 16), np.arange(16))
    np.testing.assert_array_equal(stvit.cells(16, 2).reshape(4, 4), [[0, 0, 1, 1]] * 4)  # 1 x 2 cells
    grid = stvit.cells(196, 16).reshape(14, 14)
    assert sorted(np.unique(grid).tolist()) == list(range(16))
    assert [int((grid[:, 0] == grid[r, 0]).sum()) for r in (0, 4, 7, 11)] == [4, 3, 4, 3]  # rows 14 -> 4 cells
    assert len(np.unique(stvit.cells(196, 36))) == 36 and stvit.grid_shape(36, 14) == (6, 6)
    # 11 cells cannot tile a 4 x 4 grid (11 is prime): contiguous runs of the token order instead.
    np.testing.assert_array_equal(stvit.cells(16, 11), np.arange(16) * 11 // 16)
    np.testing.assert_array_equal(stvit.cells(16, 4, spatial=False), np.repeat(np.arange(4), 4))
    with pytest.raises(ValueError, match="cannot pool"):
        stvit.cells(16, 17)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_pooling_matches_numpy_and_sizes_and_source_follow_the_cells(mode, prefix):
    x, tokens = start(2, prefix + 16, seed=prefix)
    out, new = jax.jit(stvit.pool, static_argnums=(2, 3, 4))(x, tokens, 4, prefix, mode)
    assert out.shape == (2, prefix + 4, 8)
    np.testing.assert_array_equal(out[:, :prefix], x[:, :prefix])
    cell = stvit.cells(16, 4)
    patches = np.asarray(x[:, prefix:])
    for c in range(4):
        members = patches[:, cell == c]
        expect = members.max(1) if mode == "max" else members.mean(1)
        np.testing.assert_allclose(out[:, prefix + c], expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new.sizes, np.broadcast_to([1.0] * prefix + [4.0] * 4, (2, prefix + 4)))
    np.testing.assert_array_equal(new.source[0], np.concatenate([np.arange(prefix), cell + prefix]))
    full = recover(out, new.source)  # every patch gets its cell's token
    np.testing.assert_array_equal(full[:, prefix:], np.asarray(out)[:, prefix + cell])


def test_reducer_gives_keep_refined_semantic_tokens_with_prefix_unchanged():
    x, tokens = start(2, 1 + 16, width=16)
    mask = np.ones((2, 17), bool)
    mask[1, 5:9] = False  # padded tokens are hidden from the refinement and from max pooling
    tokens = TokenState.start(2, 17, mask)
    reducer = stvit.Reducer(num_heads=2)
    variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, keep=5, prefix=1))(key(1))
    out, new = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, keep=5, prefix=1))(variables, x, tokens)
    assert out.shape == (2, 5, 16) and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 0], x[:, 0])
    np.testing.assert_array_equal(new.sizes[1], [1, 2, 2, 4, 4])  # padding (patch row 1) has size 0
    same, kept = reducer.apply(variables, x, tokens, None, keep=17, prefix=1)
    assert same is x and kept is tokens
    pooled, _ = stvit.pool(x, tokens, 4, 1)
    np.testing.assert_array_equal(pooled[1, 1], np.asarray(x)[1, [1, 2]].max(0))  # cell 0 without patches 4, 5
    assert not np.allclose(out[:, 1:], pooled[:, 1:])  # the cross-attention moved the pooled tokens


@pytest.mark.slow  # three compiles of a 4-layer ViT (init, training gradient, inference)
def test_a_vit_with_stvit_trains_its_refinement_and_runs_jitted():
    tokens = dict(method="stvit", keep=0.7, layers="1,2")
    grads, _, sizes = assert_model(**tokens)
    assert any(p.startswith("tokens_1/refine/query") for p in grads)
    assert sizes.shape == (2, 8)
    np.testing.assert_array_equal(sizes.sum(1), [17, 17])  # semantic tokens stand for all the patches

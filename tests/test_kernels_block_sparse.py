"""Block-sparse attention kernel (interpret mode on CPU) against softmax with the expanded block mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import assert_close, inputs, jit, value_and_grads

from kernels import flash_attention as fa
from kernels.block_sparse import block_sparse_attention, reference


def bigbird_like(heads, n, seed):
    """Per-head layouts: a diagonal band, a global first block, and a few random blocks (non-contiguous rows)."""
    rng = np.random.RandomState(seed)
    layout = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= 1
    layout = np.repeat(layout[None], heads, 0)
    layout[:, 0, :] = layout[:, :, 0] = True
    layout |= rng.rand(heads, n, n) < 0.15
    return layout


def check(q, k, v, ct, layout, rtol=1e-5, atol=2e-5, **kwargs):
    fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, **kwargs)  # noqa: E731
    out, grads = value_and_grads(fn, q, k, v, ct)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, layout, **kwargs), q, k, v, ct)
    assert_close(out, ref_out, rtol, rtol)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, rtol, atol)


def test_per_head_random_layout_with_padding_matches_reference():
    # L=72 is not a multiple of 16: 5 blocks, the last one partly padding. Rows are not contiguous: a table.
    q, k, v, ct = inputs(0, 72)
    layout = bigbird_like(2, 5, seed=1)
    assert fa.visit_lists(layout)[0] == "table"
    mask = np.arange(72)[None, :] < np.array([[60], [72]])
    check(q, k, v, ct, layout, block_size=16, mask=mask)


def test_shared_layout_causal_segments_gqa_and_rectangular_blocks():
    q, k, v, ct = inputs(1, 64, heads=4, kv_heads=2)
    layout = bigbird_like(1, 4, seed=2)[:, :, :]  # [1, 4 q blocks, 4 k blocks] at 16 x 16
    layout = np.repeat(layout, 2, axis=2)  # the same pattern at k blocks of 8: [1, 4, 8]
    seg = np.stack([np.repeat([1, 2, 3], [10, 30, 24]), np.ones(64, int)]).astype(np.int32)
    check(q, k, v, ct, layout, block_size=(16, 8), causal=True, segment_ids=seg)


def test_traced_layout_under_jit_matches_reference():
    q, k, v, ct = inputs(2, 48)
    layout = jnp.asarray(bigbird_like(2, 3, seed=3))

    def loss(q, k, v, layout):
        return jnp.sum(block_sparse_attention(q, k, v, layout, block_size=16) * ct)

    grads = jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, layout)
    ref = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, layout, block_size=16) * ct), argnums=(0, 1, 2))
    for g, r in zip(grads, ref(q, k, v), strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_bfloat16_close_to_float32_reference():
    q, k, v, ct = inputs(3, 64, d=32, dtype=jnp.bfloat16)
    layout = bigbird_like(2, 4, seed=4)
    out = jit(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = reference(*(x.astype(jnp.float32) for x in (q, k, v)), layout, block_size=16)
    assert_close(out, ref, 2e-2, 2e-2)


def test_unlisted_blocks_are_never_read():
    q, k, v, _ = inputs(4, 64)
    layout = np.eye(4, dtype=bool)[None]  # block-diagonal
    v_nan = v.at[:, 16:32].set(jnp.nan)  # only block 1 reads these
    out = jit(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16))(q, k, v_nan)
    rows = np.r_[0:16, 32:64]
    assert np.all(np.isfinite(out[:, rows]))
    assert_close(out[:, rows], reference(q, k, v, layout, block_size=16)[:, rows], 1e-5, 1e-5)


def test_empty_block_rows_give_zeros():
    q, k, v, _ = inputs(5, 32)
    layout = np.array([[[True, False], [False, False]]])
    out = block_sparse_attention(q, k, v, layout, block_size=16)
    np.testing.assert_array_equal(out[:, 16:], 0.0)
    assert_close(out[:, :16], reference(q, k, v, layout, block_size=16)[:, :16], 1e-5, 1e-5)


def test_clear_errors():
    q, k, v, _ = inputs(6, 32)
    with pytest.raises(ValueError, match=r"block_sparse_attention: block_mask must have shape \[1 or 2, 2, 2\]"):
        block_sparse_attention(q, k, v, np.ones((1, 3, 2), bool), block_size=16)
    with pytest.raises(ValueError, match="block_sparse_attention: block_q must be a power of two"):
        block_sparse_attention(q, k, v, np.ones((1, 3, 2), bool), block_size=(12, 16))
    with pytest.raises(ValueError, match="block_sparse_attention: block_size must be an int or"):
        block_sparse_attention(q, k, v, np.ones((1, 2, 2), bool), block_size=(16, 16, 16))


def test_table_and_traced_layouts_lower_through_triton_for_cuda(monkeypatch):
    monkeypatch.setattr(fa, "_platform_ok", lambda *a: None)
    q = jax.ShapeDtypeStruct((2, 1024, 4, 64), jnp.bfloat16)
    static = bigbird_like(4, 16, seed=0)

    def grads(q, k, v, layout):
        loss = lambda q, k, v: block_sparse_attention(  # noqa: E731
            q, k, v, layout, block_size=64, causal=True, interpret=False).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for layout in (static, jax.ShapeDtypeStruct((1, 16, 16), bool)):
        args = (q, q, q) if isinstance(layout, np.ndarray) else (q, q, q, layout)
        fn = (lambda q, k, v: grads(q, k, v, static)) if isinstance(layout, np.ndarray) else grads
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3

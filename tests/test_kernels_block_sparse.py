"""Block-sparse attention kernel (interpret mode on CPU) against softmax with the expanded block mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_close, inputs, jit, triton_calls, value_and_grads

from effjax import attention
from effjax.kernels import flash_attention as fa
from effjax.kernels.block_sparse import (
    block_sparse_attention,
    reference,
    window_global_attention,
    window_global_layout,
    window_global_reference,
)


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
        assert triton_calls(fn, *args) == 3


# ----------------------------------------------------------------------------------------------------
# Longformer's window + global pattern (window_global_attention) and the bigbird/longformer modules.

B16 = fa.BlockSizes(16, 16, 16, 16)


def padding_mask(length):
    return np.arange(length)[None, :] < np.array([[length - 7], [length]])


def segments(length):
    """Row 0: packed segments of 5, 20 and the rest; row 1: one segment."""
    row0 = np.concatenate([np.full(5, 1), np.full(20, 2), np.full(length - 25, 3)])
    return np.stack([row0, np.ones(length, int)]).astype(np.int32)


def first_and_some(length, num_global, extra):
    """bool [2, length]: the first ``num_global`` tokens, plus positions ``extra`` in batch row 1."""
    g = np.zeros((2, length), bool)
    g[:, :num_global] = True
    g[1, extra] = True
    return g


def check_window_global(q, k, v, ct, **kwargs):
    fn = lambda q, k, v: window_global_attention(q, k, v, blocks=B16, **kwargs)  # noqa: E731
    out, grads = value_and_grads(fn, q, k, v, ct)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: window_global_reference(q, k, v, **kwargs), q, k, v, ct)
    assert_close(out, ref_out, 1e-5, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_window_global_static_tokens_padding_not_multiple_matches_reference():
    # L=72: 5 blocks of 16, the last partly padding; row 1 also has a global token in the middle (50).
    q, k, v, ct = inputs(10, 72)
    glob = first_and_some(72, 2, [50])
    assert fa.visit_lists(window_global_layout(72, 16, 16, 4, glob, False))[0] == "table"
    check_window_global(q, k, v, ct, window=4, global_tokens=glob, mask=padding_mask(72))


def test_window_global_causal_segments_gqa_matches_reference():
    q, k, v, ct = inputs(11, 56, heads=4, kv_heads=2)
    check_window_global(q, k, v, ct, window=8, global_tokens=first_and_some(56, 1, [30]), causal=True,
                        mask=padding_mask(56), segment_ids=segments(56))


def test_window_global_traced_per_batch_global_mask_under_jit_matches_reference():
    q, k, v, ct = inputs(12, 64)
    glob = first_and_some(64, 0, [20, 41])
    glob[0, 7] = True

    def loss(fn, q, k, v, glob):
        return jnp.sum(fn(q, k, v, window=3, global_tokens=glob, mask=padding_mask(64)) * ct)

    kernel = lambda *a, **kw: window_global_attention(*a, blocks=B16, **kw)  # noqa: E731
    grads = jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v, glob)
    ref = jax.value_and_grad(functools.partial(loss, window_global_reference), argnums=(0, 1, 2))(q, k, v, glob)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_window_global_layout_and_tiles_outside_it_are_never_read():
    # 8 blocks of 16: the band (window 5) is tridiagonal; global tokens 0 and 70 add rows/columns 0 and 4.
    glob = first_and_some(128, 1, [70])
    layout = window_global_layout(128, 16, 16, 5, glob, causal=False)
    assert isinstance(layout, np.ndarray)
    ids = np.arange(8)
    wide = np.isin(ids, [0, 4])
    np.testing.assert_array_equal(layout[0], (np.abs(ids[:, None] - ids) <= 1) | wide[:, None] | wide[None, :])
    causal = window_global_layout(128, 16, 16, 5, glob, causal=True)
    np.testing.assert_array_equal(causal, layout & np.tril(np.ones((8, 8), bool)))
    # L=64, window 3, global token 0: query block 1 visits blocks 0-2, so NaN values in block 3 cannot reach it.
    q, k, v, _ = inputs(13, 64)
    glob = first_and_some(64, 1, [])
    fn = jit(lambda q, k, v: window_global_attention(q, k, v, window=3, global_tokens=glob, blocks=B16))
    out = fn(q, k, v.at[:, 48:].set(jnp.nan))
    ref = window_global_reference(q, k, v, window=3, global_tokens=glob)
    assert_close(out[:, 16:32], ref[:, 16:32], 1e-5, 1e-5)


def module_outputs_and_grads(name, params, q, k, v, ct, **call):
    """{impl: (output, (dq, dk, dv))} of ``attention.make(name, impl=impl, **params)`` applied to q, k, v."""
    outs = {}
    for impl in ("xla", "pallas"):
        module = attention.make(name, impl=impl, dropout_rate=0.1, **params)
        fn = lambda q, k, v, m=module: m.apply({}, q, k, v, **call)  # noqa: E731
        outs[impl] = value_and_grads(fn, q, k, v, ct)
    return outs


def assert_pallas_equals_xla(outs):
    assert_close(outs["pallas"][0], outs["xla"][0], 1e-5, 1e-5)
    for g, r in zip(outs["pallas"][1], outs["xla"][1], strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_bigbird_module_impl_pallas_equals_xla():
    # 6 blocks of 16: per-head random blocks, rows not contiguous (table visits).
    q, k, v, ct = inputs(14, 96)
    outs = module_outputs_and_grads("bigbird", dict(block_size=16, num_random_blocks=1, seed=2), q, k, v, ct,
                                    mask=padding_mask(96), segment_ids=segments(96))
    assert_pallas_equals_xla(outs)


@pytest.mark.parametrize("causal", slow_after([True, False]))
def test_longformer_module_impl_pallas_equals_xla(monkeypatch, causal):
    monkeypatch.setitem(fa.DEFAULT_BLOCKS, "cpu", B16)  # blocks smaller than the length, so tiles are skipped
    q, k, v, ct = inputs(15, 72)
    outs = module_outputs_and_grads("longformer", dict(window=8, num_global=2), q, k, v, ct, causal=causal,
                                    mask=padding_mask(72), segment_ids=segments(72))
    assert_pallas_equals_xla(outs)


def test_window_global_bigbird_and_longformer_clear_errors():
    from effjax.attention import bigbird, longformer

    q, k, v, _ = inputs(16, 32)
    glob = np.zeros((2, 32), bool)
    with pytest.raises(ValueError, match=r"window_global_attention: global_tokens must have shape \[batch, length\]"):
        window_global_attention(q, k, v, window=2, global_tokens=glob[:, :16])
    with pytest.raises(ValueError, match="window_global_attention: global_tokens must have shape.*kv_len 64"):
        window_global_attention(q, *(jnp.concatenate([x, x], 1) for x in (k, v)), window=2, global_tokens=glob)
    with pytest.raises(ValueError, match="window_global_attention: global_tokens widen a window"):
        window_global_attention(q, k, v, window=None, global_tokens=glob)
    q, k, v, _ = inputs(16, 96)
    with pytest.raises(ValueError, match=r"bigbird: no backend in impl='pallas' can run this block_sparse call "
                       r"\(triton: block_size must be a power of two, got 24\)"):
        bigbird.attend(q, k, v, block_size=24, impl="pallas")
    for method, params in ((bigbird, dict(block_size=16)), (longformer, dict(window=4))):
        with pytest.raises(ValueError, match=f"{method.NAME}: Unknown kernel backend"):
            method.attend(q, k, v, impl="cuda", **params)


def test_window_global_static_and_traced_lower_through_triton_for_cuda(monkeypatch):
    monkeypatch.setattr(fa, "_platform_ok", lambda *a: None)
    q = jax.ShapeDtypeStruct((2, 1000, 4, 64), jnp.bfloat16)
    kwargs = dict(window=128, causal=True, mask=np.ones((2, 1000), bool), segment_ids=np.ones((2, 1000), np.int32),
                  blocks=fa.DEFAULT_BLOCKS["gpu"], interpret=False)

    def grads(q, k, v, glob):
        loss = lambda q, k, v: window_global_attention(  # noqa: E731
            q, k, v, global_tokens=glob, **kwargs).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    static = first_and_some(1000, 1, [500])
    for fn, args in ((lambda q, k, v: grads(q, k, v, static), (q, q, q)),
                     (grads, (q, q, q, jax.ShapeDtypeStruct((2, 1000), bool)))):
        assert triton_calls(fn, *args) == 3

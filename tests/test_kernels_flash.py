"""Flash attention kernel (interpret mode on CPU) against the plain-JAX softmax reference: outputs and gradients.

Interpret mode fills output buffers with NaN before the kernel runs, so ``isfinite`` checks prove that
every output element is written. Sizes are small (few grid steps) to keep the file fast on one core.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_close, inputs, jit, triton_calls, value_and_grads

from effjax import attention
from effjax.kernels import flash_attention as fa
from effjax.kernels.flash_attention import BlockSizes, flash_attention, reference

B16 = BlockSizes(16, 16, 16, 16)


def padding_mask(lk):
    return np.arange(lk)[None, :] < np.array([[lk - 7], [lk]])


def segments(length):
    """Uneven packed segments: row 0 has three (lengths 5, 20, rest), row 1 one."""
    row0 = np.concatenate([np.full(5, 1), np.full(20, 2), np.full(length - 25, 3)])
    return np.stack([row0, np.ones(length, int)]).astype(np.int32)


# (name, q_len, kv_len, heads, kv_heads, call kwargs, blocks)
CASES = [
    ("bidirectional_padding_not_multiple", 40, 40, 2, 2, dict(mask="pad"), B16),
    ("causal_segments_uneven_bwd_blocks", 48, 48, 2, 2, dict(causal=True, segment_ids="seg"),
     BlockSizes(32, 16, 16, 32)),
    ("window_segments_skips_blocks", 64, 64, 2, 2, dict(window=5, segment_ids="seg"), B16),
    ("causal_window_gqa", 56, 56, 4, 2, dict(causal=True, window=9), B16),
    ("mqa_causal_cross_attention", 24, 40, 4, 1, dict(causal=True, mask="pad"), B16),
    ("single_block", 9, 9, 2, 2, dict(causal=True), BlockSizes(64, 64, 64, 64)),
]


def resolve(kwargs, lq, lk):
    out = dict(kwargs)
    if out.get("mask") == "pad":
        out["mask"] = padding_mask(lk)
    if out.get("segment_ids") == "seg":
        out["segment_ids"] = segments(lq)
    return out


@pytest.mark.parametrize("case", slow_after(CASES, keep=2, unpack=False), ids=[c[0] for c in CASES])
def test_float32_output_and_gradients_match_reference(case):
    _, lq, lk, heads, kv_heads, kwargs, blocks = case
    q, k, v, ct = inputs(0, lq, lk, heads, kv_heads)
    kwargs = resolve(kwargs, lq, lk)
    out, grads = value_and_grads(lambda q, k, v: flash_attention(q, k, v, blocks=blocks, **kwargs), q, k, v, ct)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, **kwargs), q, k, v, ct)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref_out, 1e-5, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape
        assert_close(g, r, 1e-5, 2e-5)


def test_bfloat16_output_and_gradients_match_float32_reference():
    q, k, v, ct = inputs(1, 48, heads=4, kv_heads=2, d=32, dtype=jnp.bfloat16)
    kwargs = dict(causal=True, mask=padding_mask(48))
    out, grads = value_and_grads(lambda q, k, v: flash_attention(q, k, v, blocks=B16, **kwargs), q, k, v, ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, **kwargs), *f32, ct)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_close(out, ref_out, 2e-2, 2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert_close(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, 0, 2e-2)


def test_fully_masked_rows_average_all_values_like_the_reference():
    q, k, v, ct = inputs(2, 24)
    mask = np.ones((2, 24), bool)
    mask[0] = False  # batch row 0 has no real key at all
    fn = lambda q, k, v: flash_attention(q, k, v, mask=mask, blocks=B16)  # noqa: E731
    out, grads = value_and_grads(fn, q, k, v, ct)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, mask=mask), q, k, v, ct)
    assert_close(out, ref_out, 1e-5, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_window_and_causal_visit_only_the_band_blocks():
    # Tile layouts: 8 blocks of 16 at L=128, window 5 touches at most 2 neighbours; causal keeps the lower half.
    layout = fa.band_layout(128, 128, 16, 16, causal=False, window=5)[0]
    assert layout.sum(1).max() == 3 and layout.sum() == 8 + 2 * 7
    causal = fa.band_layout(128, 128, 16, 16, causal=True, window=None)[0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((8, 8), bool)))
    mode, first, count = fa.visit_lists(layout[None])
    assert mode == "range" and list(np.asarray(count[0])) == [2] + [3] * 6 + [2]
    # Skipped blocks are never read: NaN values far outside the window leave the output finite.
    q, k, v, ct = inputs(3, 64)
    v_nan = v.at[:, 48:].set(jnp.nan)
    out = jit(lambda q, k, v: flash_attention(q, k, v, window=5, blocks=B16))(q, k, v_nan)
    assert np.all(np.isfinite(out[:, :32]))
    assert_close(out[:, :32], reference(q, k, v, window=5)[:, :32], 1e-5, 1e-5)


def test_causal_never_reads_the_future_and_padded_keys_are_ignored():
    q, k, v, _ = inputs(4, 40)
    fn = jit(lambda q, k, v: flash_attention(q, k, v, causal=True, mask=padding_mask(40), blocks=B16))
    out = fn(q, k, v)
    t = 20
    out2 = fn(q, k.at[:, t].add(3.0), v.at[:, t].add(3.0))
    np.testing.assert_array_equal(out2[:, :t], out[:, :t])
    out3 = fn(q, k.at[0, 33:].set(100.0), v.at[0, 33:].set(-50.0))  # row 0's keys 33.. are padding
    np.testing.assert_allclose(out3, out, rtol=1e-6, atol=1e-6)


def test_clear_errors():
    q, k, v, _ = inputs(5, 16)
    with pytest.raises(ValueError, match="flash_attention: head_dim must be a power of two"):
        flash_attention(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match="flash_attention: block_q must be a power of two"):
        flash_attention(q, k, v, blocks=BlockSizes(24, 16, 16, 16))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        flash_attention(*(x.astype(jnp.float16) for x in (q, k, v)))
    with pytest.raises(ValueError, match="must divide query heads"):
        flash_attention(jnp.concatenate([q, q[:, :, :1]], 2), k, v)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        flash_attention(q, k[:, :8], v[:, :8], segment_ids=np.zeros((2, 16), np.int32))
    with pytest.raises(ValueError, match="window must be >= 0"):
        flash_attention(q, k, v, window=-1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiled kernels run off CPU")
def test_compiled_kernels_on_cpu_are_refused_with_the_fix():
    q, k, v, _ = inputs(0, 16)
    with pytest.raises(NotImplementedError, match="flash_attention: compiled Pallas kernels"):
        flash_attention(q, k, v, interpret=False)


@pytest.mark.parametrize("name, params", [("softmax", {}), ("sliding_window", dict(window=6)),
                                          ("block_local", dict(block_size=16))])
def test_module_impl_pallas_equals_xla(name, params):
    q, k, v, ct = inputs(6, 48)
    mask, seg = padding_mask(48), segments(48)
    outs = {}
    for impl in ("xla", "pallas"):
        module = attention.make(name, impl=impl, dropout_rate=0.1, **params)
        variables = module.init(jax.random.key(0), q, k, v)
        fn = lambda q, k, v, m=module, vs=variables: m.apply(  # noqa: E731
            vs, q, k, v, mask=mask, segment_ids=seg, causal=True)
        outs[impl] = value_and_grads(fn, q, k, v, ct)
    assert_close(outs["pallas"][0], outs["xla"][0], 1e-5, 1e-5)
    for g, r in zip(outs["pallas"][1], outs["xla"][1], strict=True):
        assert_close(g, r, 1e-5, 2e-5)


def test_module_impl_pallas_refuses_a_pair_mask_and_an_unknown_impl():
    from effjax.attention import softmax

    q, k, v, _ = inputs(7, 16)
    with pytest.raises(ValueError, match=r"softmax: no backend in impl='pallas' can run this attention call "
                       r"\(triton: pair_mask"):
        softmax.attend(q, k, v, pair_mask=np.ones((1, 1, 16, 16), bool), impl="pallas")
    with pytest.raises(ValueError, match="softmax: Unknown kernel backend 'cuda'"):
        softmax.attend(q, k, v, impl="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype, head_dim", [(jnp.bfloat16, 64), (jnp.bfloat16, 128), (jnp.float32, 64)])
def test_compiled_on_gpu_matches_reference(dtype, head_dim):
    q, k, v, ct = inputs(8, 1000, heads=4, kv_heads=2, d=head_dim, dtype=dtype)
    kwargs = dict(causal=True, mask=padding_mask(1000), segment_ids=segments(1000))
    out, grads = value_and_grads(lambda q, k, v: flash_attention(q, k, v, interpret=False, **kwargs), q, k, v, ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, **kwargs), *f32, ct)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    assert_close(out, ref_out, tol, tol)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert_close(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, 0, tol)


@pytest.mark.parametrize("dtype, head_dim", slow_after([(jnp.bfloat16, 64), (jnp.bfloat16, 128), (jnp.float32, 64)]))
def test_forward_and_backward_lower_through_triton_for_cuda(monkeypatch, dtype, head_dim):
    # Lowering only (Triton IR inside the StableHLO), no GPU needed: catches kernels Triton cannot express.
    monkeypatch.setattr(fa, "_platform_ok", lambda *a: None)
    q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    kwargs = dict(mask=np.ones((2, 1000), bool), segment_ids=np.ones((2, 1000), np.int32), causal=True, window=300,
                  blocks=fa.DEFAULT_BLOCKS["gpu"], interpret=False)

    def grads(q, k, v):
        loss = lambda q, k, v: flash_attention(q, k, v, **kwargs).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert triton_calls(grads, q, k, k) == 3  # forward, dQ, dK/dV

"""kernels.selective_scan (interpret mode on CPU) against effjax.attention.mamba.selective_scan: outputs and
gradients with keep/reset, awkward lengths and dims, bfloat16, errors, and impl="pallas" through the mamba module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_tree_close, scan_inputs, triton_calls, value_and_grads_of

from effjax.attention import mamba
from effjax.kernels import selective_scan as ss

FLAGS = np.zeros((2, 37), bool)


def keep_mask():
    return jnp.asarray(np.arange(37)[None, :] < np.array([[29], [37]]))


def resets():
    r = FLAGS.copy()
    r[0, [5, 20]] = True
    r[1, 16] = True  # on a chunk boundary
    return jnp.asarray(r)


@pytest.mark.parametrize("length,chunk,block_p,flags", slow_after([
    (37, 16, 4, True),  # channels split over programs, keep and reset
    (37, 16, None, False),  # awkward length: padded last chunk
    (37, None, None, True),  # chunk None: the default 64 covers all
    (16, 16, None, False),  # a single chunk
]))
def test_outputs_and_gradients_equal_reference(length, chunk, block_p, flags):
    args = scan_inputs(0, length=length, p=6 if block_p is None else 8)
    opts = dict(keep=keep_mask(), reset=resets()) if flags else {}
    cot = jax.random.normal(jax.random.key(1), args[0].shape)
    kernel = lambda *a: ss.selective_scan(*a, chunk_size=chunk, block_p=block_p, **opts)
    ref = lambda *a: mamba.selective_scan(*a, chunk_size=chunk, **opts)
    out, grads = value_and_grads_of(kernel, args, cot)
    want, want_grads = value_and_grads_of(ref, args, cot)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert_tree_close(out, want, 1e-5, 1e-5)
    assert_tree_close(grads, want_grads, 1e-4, 1e-5)


@pytest.mark.slow
def test_bfloat16_inputs():
    args = scan_inputs(2, length=40, dtype=jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(3), args[0].shape)
    out, grads = value_and_grads_of(lambda *a: ss.selective_scan(*a, chunk_size=16), args, cot)
    want, want_grads = value_and_grads_of(lambda *a: mamba.selective_scan(*a, chunk_size=16), args, cot)
    assert_tree_close(out, want, 1e-2, 1e-2)
    assert_tree_close(grads, want_grads, 2e-2, 2e-2)


def test_clear_errors():
    x, delta, a_log, b, c, d_skip = scan_inputs(4, length=8)
    with pytest.raises(ValueError, match="selective_scan: a_log must have shape"):
        ss.selective_scan(x, delta, a_log[:, :, :3], b, c, d_skip)
    with pytest.raises(ValueError, match="x and delta must both have shape"):
        ss.selective_scan(x, delta[:, :4], a_log, b, c, d_skip)
    with pytest.raises(ValueError, match="keep must have shape"):
        ss.selective_scan(x, delta, a_log, b, c, d_skip, keep=jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ss.selective_scan(x, delta, a_log, b, c, d_skip, chunk_size=0)
    with pytest.raises(ValueError, match="block_p must be a power of two"):
        ss.selective_scan(x, delta, a_log, b, c, d_skip, block_p=6)
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        ss.selective_scan(x.astype(jnp.int32), delta, a_log, b, c, d_skip)


@pytest.mark.parametrize("causal", slow_after([True, False], keep=0))
def test_mamba_module_pallas_equals_xla(causal):
    keys = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kk, (2, 40, 2, 8)) for kk in keys)
    mask = jnp.asarray(np.arange(40)[None, :] < np.array([[33], [40]]))
    segments = jnp.asarray(np.repeat(np.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]), 8, axis=1))
    cot = jax.random.normal(jax.random.key(6), q.shape)
    variables = mamba.Attention(chunk_size=16).init(jax.random.key(0), q, k, v, causal=causal)
    results = []
    for impl in ("xla", "pallas"):
        module = mamba.Attention(chunk_size=16, impl=impl)
        fn = lambda vs, q, k, v, module=module: module.apply(vs, q, k, v, mask=mask, segment_ids=segments,
                                                             causal=causal)
        results.append(value_and_grads_of(fn, [variables, q, k, v], cot))
    assert_tree_close(results[1], results[0], 1e-4, 1e-5)
    with pytest.raises(ValueError, match="mamba: Unknown kernel backend"):
        mamba.Attention(impl="cuda").apply(variables, q, k, v, causal=causal)


def test_kernels_lower_to_triton():
    # Lowering only (no GPU needed): Pallas -> Triton IR for the forward and backward kernels.
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((2, 256, 2, 64), f32)
    b = jax.ShapeDtypeStruct((2, 256, 2, 16), f32)
    a_log, d_skip = jax.ShapeDtypeStruct((2, 64, 16), f32), jax.ShapeDtypeStruct((2, 64), f32)
    fn = lambda *a: ss.selective_scan(*a, interpret=False)
    grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(6)))
    assert triton_calls(grad, x, x, a_log, b, b, d_skip) == 2

"""Shared checks for the attention kernel tests: inputs, jitted value and gradients, closeness with a write check."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

TRITON = "__gpu$xla.gpu.triton"


def jit(fn):
    """jax.jit without XLA's backend optimisations: they dominate compile time here and change no results."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def inputs(seed, lq, lk=None, heads=2, kv_heads=None, d=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    lk = lk or lq
    kv_heads = kv_heads or heads
    q = jax.random.normal(keys[0], (2, lq, heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (2, lk, kv_heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (2, lk, kv_heads, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, ct


def value_and_grads(fn, q, k, v, ct):
    """Output and d(sum(out * ct))/d(q, k, v), jitted."""
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    out = jit(fn)(q, k, v)
    return out, jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_close(ours, ref, rtol, atol):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(ours)), "kernel left unwritten (NaN) or non-finite elements"
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)


def value_and_grads_of(fn, args, cot):
    """fn(*args) and the gradient of sum(fn * cot) with respect to every arg, jitted."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)  # noqa: E731
    return jit(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*args)


def assert_tree_close(got, want, rtol, atol):
    """Every leaf finite (so written) and close, with ``atol`` scaled by the leaf's largest reference value."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(np.abs(w).max())))


def _target_gpu():
    """On a machine without a GPU, an abstract H100 to lower for (jax >= 0.12 asks for one to pick Triton's
    compute capability; before, it lowered without); nothing where a GPU is present or jax lacks the API."""
    if jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def triton_calls(fn, *args) -> int:
    """How many Triton kernels ``jax.export`` of jitted ``fn`` for CUDA holds: lowering only, no GPU needed."""
    with _target_gpu():
        exported = export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exported.mlir_module().count(TRITON)


def linear_inputs(seed, b=2, lq=37, lk=37, h=2, m=8, dv=8, dtype=jnp.float32):
    """Positive features phi_q, phi_k [b, len, h, m], values [b, lk, h, dv] and a spare key, for the linear kernels."""
    keys = jax.random.split(jax.random.key(seed), 4)
    phi_q = jnp.exp(0.5 * jax.random.normal(keys[0], (b, lq, h, m))).astype(dtype)
    phi_k = jnp.exp(0.5 * jax.random.normal(keys[1], (b, lk, h, m))).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, h, dv)).astype(dtype)
    return phi_q, phi_k, v, keys[3]


def lengths_mask(lengths, n):
    return jnp.asarray(np.arange(n)[None, :] < np.asarray(lengths)[:, None])


def scan_inputs(seed, b=2, length=37, h=2, p=6, n=5, dtype=jnp.float32):
    """x, delta, a_log, b, c, d_skip of the selective scan at Mamba-like scales."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (b, length, h, p))
    delta = jax.nn.softplus(jax.random.normal(keys[1], (b, length, h, p)) - 1.0)
    a_log = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)) + 0.1 * jax.random.normal(keys[2], (h, p, n))
    bb = jax.random.normal(keys[3], (b, length, h, n))
    cc = jax.random.normal(keys[4], (b, length, h, n))
    d_skip = 1.0 + 0.1 * jax.random.normal(keys[5], (h, p))
    return [t.astype(dtype) for t in (x, delta, a_log, bb, cc, d_skip)]

"""kernels.delta_rule (the chunked delta rule on Triton, interpreted on CPU) against the XLA core
``effjax.attention.delta_rule.delta_rule(form="chunked")``: outputs, final states and the gradients of q, k, v, beta,
log_decay and the initial state, for DeltaNet and gated, with an A-B-A pack, an initial state, lengths the chunk does
not divide, several chunks and value blocks, strong decays and bfloat16; the dispatch's "delta" op and its refusals;
per shard under a mesh; and lowering to Triton for CUDA from this CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import slow_after
from kernel_checks import assert_tree_close, jit, triton_calls

from effjax.attention.delta_rule import delta_rule
from effjax.kernels import delta_rule as kd
from effjax.kernels import dispatch, triton_backend

NAMES = ("q", "k", "v", "beta", "log_decay", "initial_state")
# L = 40: an A-B-A pack in row 0 (the third run must not reconnect to the first), one-token runs in row 1.
ABA = np.array([[3] * 19 + [5] * 8 + [3] * 13, [0] * 5 + [1] + [2] * 32 + [7, 8]])
EDGES = np.repeat([[0, 1, 2], [4, 5, 4]], [64, 64, 22], axis=1)  # 150 tokens, runs starting at both 64-chunk edges


def delta_inputs(seed, length=40, d_k=8, d_v=8, heads=2, low=-0.5, decay=True, state=True, dtype=jnp.float32):
    """q, unit k and v ``[2, length, heads, d]`` in ``dtype``, beta in (0, 1), log-decays in [low, 0] (None without
    decay) and a float32 initial state (None without)."""
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, 2, length, heads, d_k))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(2, length, heads, d_v))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return dict(q=f32(q).astype(dtype), k=f32(k).astype(dtype), v=f32(v).astype(dtype),
                beta=f32(rng.uniform(0, 1, (2, length, heads))),
                log_decay=f32(rng.uniform(low, 0, (2, length, heads))) if decay else None,
                initial_state=f32(rng.normal(size=(2, heads, d_k, d_v))) if state else None)


def core(q, k, v, beta, log_decay=None, *, chunk_size, segment_ids=None, initial_state=None):
    return delta_rule(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), beta, log_decay,
                      form="chunked", chunk_size=chunk_size, segment_ids=segment_ids, initial_state=initial_state)


def values_and_grads(fn, x, cotangents):
    """``(out, state)`` and the gradient of ``sum(out * c_out) + sum(state * c_state)`` w.r.t. each given input."""
    names = [n for n in NAMES if x[n] is not None]

    def run(*arrays):
        return fn(**dict(zip(names, arrays, strict=True)))

    def loss(*arrays):
        return sum(jnp.sum(y.astype(jnp.float32) * c) for y, c in zip(run(*arrays), cotangents, strict=True))

    return jit(lambda *a: (run(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*(x[n] for n in names))


def compare_with_core(entry, x, *, chunk, segment_ids=None, tol=(1e-5, 1e-4), **options):
    """``entry`` (a kernel's ``chunked_delta_rule``) against the core: outputs, final state, gradients. Returns
    the largest error of the outputs and state and of the gradients, relative to each leaf's largest value."""
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    kernel = functools.partial(entry, chunk_size=chunk, segment_ids=segment_ids, return_state=True, **options)
    keys = jax.random.split(jax.random.key(7))
    b, length, h, d_k = x["k"].shape
    cotangents = (jax.random.normal(keys[0], (b, length, h, x["v"].shape[-1])),
                  jax.random.normal(keys[1], (b, h, d_k, x["v"].shape[-1])))
    got, got_grads = values_and_grads(kernel, x, cotangents)
    want, want_grads = values_and_grads(functools.partial(core, chunk_size=chunk, segment_ids=segment_ids), x,
                                        cotangents)
    assert got[0].shape == want[0].shape and got[0].dtype == got[1].dtype == jnp.float32
    assert all(g.dtype == x[n].dtype for g, n in zip(got_grads, [n for n in NAMES if x[n] is not None], strict=True))
    assert_tree_close(got, want, tol[0], tol[0])
    assert_tree_close(got_grads, want_grads, tol[1], tol[1])
    return relative_error(got, want), relative_error(got_grads, want_grads)


def relative_error(got, want):
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - w)) / max(1.0, float(np.max(np.abs(w)))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


CASES = [  # name, input options, chunk, segments, kernel options
    ("gated, A-B-A, initial state, 40 = 2.5 chunks", dict(), 16, ABA, dict()),
    ("DeltaNet, one-token runs, no state", dict(decay=False, state=False), 32, ABA, dict()),
    # 3 chunks of 64, d_k 12 -> 16, d_v 40 -> 64 in 4 value blocks
    ("gated, 150 tokens, value blocks", dict(length=150, d_k=12, d_v=40), 64, EDGES, dict(block_v=16)),
    # g down to -30 per token: e^{b} underflows to 0 inside a chunk of 16, and the exponents stay <= 0
    ("strong decays", dict(low=-30.0), 16, ABA, dict()),
    ("DeltaNet, one chunk of 64 for 40 tokens", dict(decay=False), 64, None, dict()),
]


@pytest.mark.parametrize("name,inputs,chunk,segments,options", slow_after(CASES, keep=1))
def test_outputs_states_and_gradients_equal_the_core(name, inputs, chunk, segments, options):
    compare_with_core(kd.chunked_delta_rule, delta_inputs(0, **inputs), chunk=chunk, segment_ids=segments, **options)


@pytest.mark.slow
def test_bfloat16_inputs_match_the_float32_core():
    x = delta_inputs(1, length=70, d_k=16, d_v=16, dtype=jnp.bfloat16)
    compare_with_core(kd.chunked_delta_rule, x, chunk=32, segment_ids=np.repeat([[0, 1], [2, 2]], [30, 40], axis=1),
                      tol=(1e-2, 2e-2))


def test_the_delta_op_runs_on_triton_and_refuses_in_one_line():
    f32, half = jnp.float32, jnp.float16
    x = jax.ShapeDtypeStruct((2, 300, 4, 64), f32)
    beta = jax.ShapeDtypeStruct((2, 300, 4), f32)
    call = dict(q=x, k=x, v=x, beta=beta, log_decay=beta, chunk_size=64, initial_state=None, return_state=True)
    assert "delta" in dispatch.OPS and triton_backend.OPS["delta"] is kd.chunked_delta_rule
    choice, fn = dispatch.choose("delta", "triton", call, where="test_delta")
    assert choice.backend == "triton" and fn is kd.chunked_delta_rule
    assert dispatch.choose("delta", "pallas", call, where="test_delta")[0].backend == "triton"  # on a CPU
    reasons = {
        "float16": dict(q=jax.ShapeDtypeStruct(x.shape, half), k=jax.ShapeDtypeStruct(x.shape, half)),
        "chunk_size must be a power of two between 16 and 128, got 48": dict(chunk_size=48),
        "chunk_size must be a power of two between 16 and 128, got 256": dict(chunk_size=256),
        "d_k 300 pads to 512 > 256": dict(q=jax.ShapeDtypeStruct((2, 300, 4, 300), f32),
                                          k=jax.ShapeDtypeStruct((2, 300, 4, 300), f32)),
        "initial_state must be float32": dict(initial_state=jax.ShapeDtypeStruct((2, 4, 64, 64), jnp.bfloat16)),
        "compiled Triton kernels need a GPU": dict(interpret=False),
    }
    for reason, change in reasons.items():
        why = triton_backend.supports("delta", {**call, **change})
        assert reason in why and "\n" not in why, why
    with pytest.raises(dispatch.NoBackendError, match="triton: chunk_size must be"):
        dispatch.choose("delta", "triton", {**call, "chunk_size": 48}, where="test_delta")
    assert dispatch.choose("delta", "triton,xla", {**call, "chunk_size": 48}, where="test_delta")[1] is None


@pytest.mark.slow
def test_dispatch_runs_the_kernel_and_falls_back_to_the_core():
    x = delta_inputs(2, length=24)
    call = dict(**x, chunk_size=16, segment_ids=jnp.asarray(ABA[:, :24]), return_state=True)
    want = core(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], chunk_size=16,
                segment_ids=call["segment_ids"], initial_state=x["initial_state"])
    for impl in ("pallas", "mosaic_tpu", "xla"):
        got = dispatch.run("delta", impl, call, xla=lambda: want, where="test_delta")
        assert_tree_close(got, want, 1e-5, 1e-5)


@pytest.mark.slow
def test_per_shard_under_a_mesh_equals_the_unsharded_call():
    # 8 emulated devices (2 x 2 x 2): batch over data x fsdp, heads over tensor, through sharding.per_shard.
    x = {name: None if a is None else jnp.concatenate([a, a[::-1]]) for name, a in delta_inputs(3, length=24).items()}
    segments = jnp.asarray(np.concatenate([ABA, ABA])[:, :24])
    fn = functools.partial(kd.chunked_delta_rule, chunk_size=16, segment_ids=segments, return_state=True)
    cotangents = (jax.random.normal(jax.random.key(1), x["v"].shape),
                  jax.random.normal(jax.random.key(2), x["initial_state"].shape))
    want = values_and_grads(fn, x, cotangents)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("length", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert "shard_map" in str(jax.make_jaxpr(lambda *a: fn(*a))(*(x[n] for n in ("q", "k", "v", "beta"))))
        got = values_and_grads(fn, x, cotangents)
    assert_tree_close(got, want, 1e-6, 1e-6)


LOWERING = [(jnp.bfloat16, 128, 128, 64), (jnp.float32, 64, 200, 32)]  # dtype, d_k, d_v, chunk


@pytest.mark.parametrize("dtype,d_k,d_v,chunk", slow_after(LOWERING))
def test_forward_and_backward_lower_to_triton(dtype, d_k, d_v, chunk):
    # Lowering only (no GPU needed): one forward kernel, and forward + backward for the gradient.
    qk = jax.ShapeDtypeStruct((2, 256, 2, d_k), dtype)
    v = jax.ShapeDtypeStruct((2, 256, 2, d_v), dtype)
    beta = jax.ShapeDtypeStruct((2, 256, 2), jnp.float32)
    state = jax.ShapeDtypeStruct((2, 2, d_k, d_v), jnp.float32)

    def fn(q, k, v, beta, g, s):
        return kd.chunked_delta_rule(q, k, v, beta, g, chunk_size=chunk, initial_state=s, return_state=True,
                                     interpret=False)

    grad = jax.grad(lambda *a: sum(jnp.sum(y) for y in fn(*a)), argnums=tuple(range(6)))
    assert triton_calls(fn, qk, qk, v, beta, beta, state) == 1
    assert triton_calls(grad, qk, qk, v, beta, beta, state) == 2

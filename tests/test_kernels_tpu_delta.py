"""kernels.tpu_delta (the chunked delta rule in Mosaic TPU, TPU interpret mode on CPU) against the XLA core
``effjax.attention.delta_rule.delta_rule(form="chunked")``: outputs, final states and the gradients of every input,
for DeltaNet and gated, with an A-B-A pack, an initial state, lengths the chunk does not divide, several chunks and
value blocks, strong decays and bfloat16; the backend contract; per shard under a mesh; and Mosaic lowering for TPU
from this CPU (forward and gradient), so that a rejected block shape fails here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from test_kernels_delta import ABA, EDGES, compare_with_core, delta_inputs
from test_kernels_tpu_linear import tpu_calls

from effjax.kernels import dispatch, tpu_delta

CASES = [  # name, input options, chunk, segments
    ("gated, A-B-A, initial state, 40 = 2.5 chunks", dict(), 16, ABA),
    ("DeltaNet, one-token runs, no state", dict(decay=False, state=False), 32, ABA),
    ("gated, 150 tokens, 3 chunks", dict(length=150, d_k=12, d_v=20), 64, EDGES),  # d_k, d_v padded to 128 lanes
    ("strong decays", dict(low=-30.0), 16, ABA),
    # d_v 520 pads to 640 lanes: five value blocks of 128, each with its slice of the state
    ("five value blocks", dict(length=24, d_v=520), 16, ABA[:, :24]),
]


@pytest.mark.parametrize("name,inputs,chunk,segments", slow_after(CASES, keep=1))
def test_outputs_states_and_gradients_equal_the_core(name, inputs, chunk, segments):
    compare_with_core(tpu_delta.chunked_delta_rule, delta_inputs(0, **inputs), chunk=chunk, segment_ids=segments)


@pytest.mark.slow
def test_bfloat16_inputs_match_the_float32_core():
    x = delta_inputs(1, length=70, d_k=16, d_v=16, dtype=jnp.bfloat16)
    compare_with_core(tpu_delta.chunked_delta_rule, x, chunk=32,
                      segment_ids=np.repeat([[0, 1], [2, 2]], [30, 40], axis=1), tol=(1e-2, 2e-2))


# Under a mesh both backends go through the same kernels.delta_rule.per_shard_core, checked with the Triton kernel
# in tests/test_kernels_delta.py.


def test_backend_contract():
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((2, 300, 4, 64), f32)
    beta = jax.ShapeDtypeStruct((2, 300, 4), f32)
    call = dict(q=x, k=x, v=x, beta=beta, log_decay=None, chunk_size=64, return_state=True)
    assert tpu_delta.NAME == "mosaic_tpu" and tpu_delta.PLATFORMS == ("tpu",) and list(tpu_delta.OPS) == ["delta"]
    assert "tpu_delta" in dispatch.BACKENDS["mosaic_tpu"]
    assert dispatch.choose("delta", "mosaic_tpu", call, where="test_tpu_delta")[1] is tpu_delta.chunked_delta_rule
    assert tpu_delta.supports("delta", call) is None  # CPU: TPU interpret mode
    assert tpu_delta.supports("delta", {**call, "chunk_size": 256}) is None
    assert "op 'linear'" in tpu_delta.supports("linear", call)
    half = jax.ShapeDtypeStruct(x.shape, jnp.float16)
    wide = jax.ShapeDtypeStruct((2, 300, 4, 600), f32)
    reasons = {
        "float16": dict(q=half, k=half, v=half),
        "chunk_size must be a power of two between 16 and 256, got 100": dict(chunk_size=100),
        "d_k 600 pads to more than 512 lanes": dict(q=wide, k=wide),
        "log_decay must be a float array [batch, length, heads]": dict(log_decay=x),
        "interpret=True": dict(interpret=False),
        "unexpected keyword": dict(mask=None),
    }
    for reason, change in reasons.items():
        why = tpu_delta.supports("delta", {**call, **change})
        assert reason in why and "\n" not in why, why


LOWERING = [(jnp.bfloat16, 128, 128, 64, 300), (jnp.float32, 64, 200, 16, 37)]  # dtype, d_k, d_v, chunk, length


@pytest.mark.parametrize("dtype,d_k,d_v,chunk,length", slow_after(LOWERING))
def test_forward_and_backward_lower_for_tpu(dtype, d_k, d_v, chunk, length):
    # Lowering only: Pallas -> Mosaic, one kernel forward, two with the gradient (forward storing states, backward).
    qk = jax.ShapeDtypeStruct((1, length, 2, d_k), dtype)
    v = jax.ShapeDtypeStruct((1, length, 2, d_v), dtype)
    beta = jax.ShapeDtypeStruct((1, length, 2), jnp.float32)
    state = jax.ShapeDtypeStruct((1, 2, d_k, d_v), jnp.float32)

    def fn(q, k, v, beta, g, s):
        return tpu_delta.chunked_delta_rule(q, k, v, beta, g, chunk_size=chunk, initial_state=s, return_state=True,
                                            interpret=False)

    grad = jax.grad(lambda *a: sum(jnp.sum(y) for y in fn(*a)), argnums=tuple(range(6)))
    assert tpu_calls(fn, qk, qk, v, beta, beta, state) == 1
    assert tpu_calls(grad, qk, qk, v, beta, beta, state) == 2

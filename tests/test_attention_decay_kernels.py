"""The kernel path (``impl``) of the decayed linear-attention methods (``retnet``, ``gla``, ``hgrn2``, ``mamba2``):
their chunked form on the chunked linear-attention kernel (``kernels/linear_attention.py`` interpreted on this CPU,
and once its Mosaic TPU twin in TPU interpret mode) equals their XLA path in outputs, final state and gradients,
with padding, A-B-A segments and an initial state, per-head (retnet, mamba2) and per-channel (gla, hgrn2) decays;
both scans of the bidirectional forms too. The core ``gated_linear``: chunks below the kernel's 16, strong decays,
the forms that stay XLA, and the ``impl`` check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_attention_decay_methods import MASK, SEGMENTS, B, D, H, L, init, qkv, random_params

from effjax.attention import gated_linear as core
from effjax.attention import gla, hgrn2, mamba2, retnet
from effjax.kernels import dispatch

MODULES = {"retnet": retnet, "gla": gla, "hgrn2": hgrn2, "mamba2": mamba2}
D_CONV = 4  # mamba2's default conv taps
TOL = 5e-5  # relative to the largest entry of each compared array (measured at most 2.6e-5, gradients)
FAST = {"xla_backend_optimization_level": 0}
FORMS = ("parallel", "recurrent")  # the forms that stay XLA whatever impl says


def initial_state(name, seed):
    rng = np.random.default_rng(seed)
    ssm = jnp.asarray(rng.normal(size=(B, H, D, D)), jnp.float32)
    if name != "mamba2":
        return ssm
    return mamba2.Mamba2State(ssm, jnp.asarray(rng.normal(size=(B, D_CONV - 1, 3, H, D)), jnp.float32))


def cotangent(x, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=x.shape), jnp.float32)


def value_and_grads(name, impl, *, causal=True, bidirectional=None, seed=0):
    """Outputs, final state (causal) and the gradients of a random projection of both with respect to the
    params, q, k, v (and the initial state), through ``attend`` with padding, A-B-A segments and chunks of 16."""
    module = MODULES[name]
    q, k, v = qkv(seed)
    params = random_params(init(name), seed + 1)
    extra = {} if bidirectional is None else {"bidirectional": bidirectional}
    call = dict(mask=MASK, segment_ids=SEGMENTS, causal=causal, chunk_size=16, impl=impl, **extra)
    state = initial_state(name, seed + 2) if causal else None
    ct = cotangent(q, seed + 3)

    def loss(params, q, k, v, state):
        if not causal:
            out = module.attend(q, k, v, params, **call)
            return jnp.sum(out * ct), (out,)
        out, final = module.attend(q, k, v, params, initial_state=state, return_state=True, **call)
        projected = sum(jnp.sum(x * cotangent(x, seed + 4)) for x in jax.tree.leaves(final))
        return jnp.sum(out * ct) + projected, (out, final)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    return jax.jit(fn, compiler_options=FAST)(params, q, k, v, state)


def largest_difference(got, want) -> float:
    """The largest absolute difference over the leaves, each relative to its largest entry (at least 1)."""
    return max(float(np.abs(np.asarray(g) - np.asarray(w)).max() / max(1.0, float(np.abs(w).max())))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def assert_same(got, want, tol=TOL):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


def check_kernel_equals_xla(name, impl="pallas", backend="triton", **kwargs):
    got = value_and_grads(name, impl, **kwargs)
    assert dispatch.choices()[name].backend == backend, dispatch.choices()[name]
    assert_same(got, value_and_grads(name, "xla", **kwargs))


@pytest.mark.parametrize("name", ["retnet", "gla", pytest.param("hgrn2", marks=pytest.mark.slow),
                                  pytest.param("mamba2", marks=pytest.mark.slow)])
def test_kernel_equals_xla_with_padding_segments_and_initial_state(name):
    """Per-head (retnet, mamba2) and per-channel (gla, hgrn2) decays: values, state and gradients."""
    check_kernel_equals_xla(name)


@pytest.mark.slow
@pytest.mark.parametrize("name, bidirectional", [("retnet", None), ("gla", "sum")])
def test_kernel_equals_xla_in_both_directions(name, bidirectional):
    """causal=False: each of the forward and the reversed scans on the kernel (retnet's own symmetric form; the
    others share ``gated_linear.forward_or_both`` with gla)."""
    check_kernel_equals_xla(name, causal=False, bidirectional=bidirectional)


@pytest.mark.slow
def test_mosaic_tpu_kernel_equals_xla_in_tpu_interpret_mode():
    """The Mosaic TPU twin (per-channel decays: its vector kernel) under the TPU simulator."""
    with pltpu.force_tpu_interpret_mode():
        check_kernel_equals_xla("gla", impl="mosaic_tpu", backend="mosaic_tpu")


# --- the core ------------------------------------------------------------------------------------------------

def core_inputs(seed, vector, strength):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32) for _ in range(3))
    shape = (B, L, H, D) if vector else (B, L, H)
    log_decay = jnp.asarray(-rng.uniform(0.0, strength, size=shape), jnp.float32)
    return q, k, v, log_decay, jnp.asarray(rng.normal(size=(B, H, D, D)), jnp.float32)


def core_value_and_grads(impl, inputs, chunk_size, form="chunked"):
    ct = cotangent(inputs[0], 11)
    cs = cotangent(inputs[-1], 12)

    def loss(q, k, v, log_decay, state):
        out, final = core.gated_linear(q, k, v, log_decay, form=form, chunk_size=chunk_size, initial_state=state,
                                       segment_ids=SEGMENTS, mask=MASK, impl=impl)
        return jnp.sum(out * ct) + jnp.sum(final * cs), (out, final)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*inputs)


@pytest.mark.slow
@pytest.mark.parametrize("vector", [True])
def test_core_kernel_with_chunks_below_sixteen_and_strong_decays(vector):
    """chunk_size 8 runs the kernel with chunks of 16; decays down to e^-8 per step (the state nearly cleared)."""
    inputs = core_inputs(20 + vector, vector, strength=8.0)
    got = core_value_and_grads("pallas", inputs, 8)
    assert dispatch.choices()[core.NAME].backend == "triton"
    assert_same(got, core_value_and_grads("xla", inputs, 8))


def test_core_forms_other_than_chunked_stay_xla_and_impl_is_checked(monkeypatch):
    inputs = core_inputs(30, True, strength=1.0)
    want = {form: core.gated_linear(*inputs[:4], form=form, initial_state=inputs[4]) for form in FORMS}
    monkeypatch.setattr(dispatch, "run", lambda *a, **kw: pytest.fail("the parallel and recurrent forms dispatched"))
    for form in FORMS:
        assert_same(core.gated_linear(*inputs[:4], form=form, initial_state=inputs[4], impl="pallas"), want[form], 0.0)
    with pytest.raises(ValueError, match="^retnet: Unknown kernel backend 'cuda'"):
        core.gated_linear(*inputs[:4], impl="cuda", method="retnet")
    with pytest.raises(ValueError, match="^gla: Unknown kernel backend"):
        gla.attend(*inputs[:3], random_params(init("gla"), 0), causal=True, impl="triton,cuda")

"""The kernel path (``impl``) of ``deltanet`` and ``gated_deltanet``: their chunked form on the chunked delta-rule
kernel (``kernels/delta_rule.py`` interpreted on this CPU; ``kernels/tpu_delta.py`` in TPU interpret mode in the slow
tier) equals their XLA path in outputs, final state and the gradients of everything, with padding, an A-B-A pack and
an initial state; the parallel and recurrent forms never dispatch; a chunk the kernel refuses falls back to XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_attention_delta_methods import MASK, METHODS, SEGMENTS, B, D, H, qkv, variables

from effjax.kernels import dispatch

FAST = {"xla_backend_optimization_level": 0}
TOL = 5e-5  # relative to the largest entry of each array (the kernels measured 6.7e-7 against the core)


def value_and_grads(name, impl, *, form="chunked", chunk_size=16, seed=0):
    q, k, v = qkv(seed)
    params = variables(name)
    rng = np.random.default_rng(seed)
    state = jnp.asarray(rng.normal(size=(B, H, D, D)), jnp.float32)
    out_ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    state_ct = jnp.asarray(rng.normal(size=state.shape), jnp.float32)

    def loss(params, q, k, v, state):
        out, final = METHODS[name].attend(q, k, v, params, mask=MASK, segment_ids=SEGMENTS, causal=True, form=form,
                                          chunk_size=chunk_size, initial_state=state, return_state=True, impl=impl)
        return jnp.sum(out * out_ct) + jnp.sum(final * state_ct), (out, final)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    return jax.jit(grad, compiler_options=FAST)(params, q, k, v, state)


def assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize("name", ["gated_deltanet", pytest.param("deltanet", marks=pytest.mark.slow)])
def test_the_kernel_path_equals_xla_in_outputs_state_and_gradients(name):
    got = value_and_grads(name, "pallas")
    assert dispatch.choices()[name].backend == "triton"
    assert_same(got, value_and_grads(name, "xla"))


@pytest.mark.slow
def test_the_tpu_kernel_path_equals_xla():
    with pltpu.force_tpu_interpret_mode():
        got = value_and_grads("gated_deltanet", "mosaic_tpu")
    assert dispatch.choices()["gated_deltanet"].backend == "mosaic_tpu"
    assert_same(got, value_and_grads("gated_deltanet", "xla"))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_forms_other_than_chunked_never_dispatch(form, monkeypatch):
    monkeypatch.setattr(dispatch, "run", lambda *a, **kw: pytest.fail("dispatched"))
    assert_same(value_and_grads("deltanet", "pallas", form=form), value_and_grads("deltanet", "xla", form=form))


@pytest.mark.slow
def test_a_chunk_the_kernel_refuses_falls_back_to_xla():
    got = value_and_grads("gated_deltanet", "pallas,xla", chunk_size=8)  # the kernels take chunks >= 16
    choice = dispatch.choices()["gated_deltanet"]
    assert choice.backend == "xla" and "chunk" in dict(choice.skipped)["triton"]
    assert_same(got, value_and_grads("gated_deltanet", "xla", chunk_size=8))

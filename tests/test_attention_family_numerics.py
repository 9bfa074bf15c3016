"""The three recurrence cores of the modern linear-attention families at the head dims and precision they run at.

The core test files (``test_attention_gated_linear.py``, ``test_attention_delta_rule.py``, ``test_attention_dplr.py``)
check every form at head dims of 4-16 in float32. Official code uses 64 and 128 (catalog ``linear_families.md``:
Mamba2's P = 64, RWKV-7's asserted 64, Qwen3-Next's and HGRN2's 128), and the catalog's oracles (Sec. 2.11) ask
for bfloat16 inputs too; at those sizes a chunked form's sums over d_k, its triangular solves and its carries are
longer. Here the chunked form at chunk 64 over 160 tokens (two carries across chunk boundaries, a padded last
chunk), from a nonzero initial state, is checked

  * at d = 64 and 128 in float32 against the float64 token recurrences of those files (written from the papers'
    equations, not the library's recurrent form), to 1e-4 of the output's scale, for ``gated_linear`` with a scalar
    decay (RetNet, Mamba2) and a vector decay (GLA, HGRN2), ``delta_rule`` without and with a decay (DeltaNet,
    Gated DeltaNet; beta up to 2) and ``dplr`` (RWKV-7);
  * with bfloat16 q, k, v and float32 gates (as the methods pass them) at d = 64: float32 outputs and final
    states, as the cores document, finite and within 2e-2 of the output's scale of the float64 recurrence on the
    same bf16-rounded inputs. The oracle is float64, not the core's own float32 path, so that a dropped decay or
    a wrong carry fails here too (they are off by 0.1 to 4 of the scale).

Inputs are drawn at the methods' scales: q with the d^-1/2 the methods apply, l2-normalised q and k for the delta
rule, and log-decays from the methods' parameterisations and inits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_delta_rule import reference as delta_recurrence
from test_attention_delta_rule import unit
from test_attention_dplr import reference as dplr_recurrence
from test_attention_dplr import rwkv_inputs
from test_attention_gated_linear import recurrence as decay_recurrence

from effjax.attention.delta_rule import delta_rule
from effjax.attention.dplr import dplr
from effjax.attention.gated_linear import gated_linear

CHUNK = 64
LENGTH = 160
HEADS = 2
FLOAT32_TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2e-2


@functools.cache
def chunked(core):
    """The core's chunked form at chunk 64, jitted without XLA's backend optimisations (one compile per shape)."""
    return jax.jit(functools.partial(core, form="chunked", chunk_size=CHUNK),
                   compiler_options={"xla_backend_optimization_level": 0})


def softplus(x):
    return np.logaddexp(0.0, x)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def mamba2_log_decay(rng, shape, a_range):
    """``-A softplus(x + dt_bias)`` per head: A uniform in ``a_range``, dt_bias = softplus^-1(dt) with dt
    log-uniform in [1e-3, 0.1] (Mamba2's and Gated DeltaNet's inits), x standard normal."""
    heads = shape[-1]
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), heads))
    dt_bias = dt + np.log(-np.expm1(-dt))
    return -rng.uniform(*a_range, heads) * softplus(rng.normal(size=shape) + dt_bias)


def float32(*arrays):
    return [np.asarray(x, np.float32) for x in arrays]


def decayed_inputs(seed, dim, decay):
    """q, k, v, log-decay, initial state (float32) for ``gated_linear``. ``decay`` "scalar": RetNet's gamma = 1 -
    2^-5 on head 0, Mamba2's dt A on head 1; "vector": GLA's logsigmoid(x) / 16 on half the key channels, HGRN2's
    log(gamma + (1 - gamma) sigmoid(x)) with gamma = 0.3 on the other half."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, LENGTH, HEADS, dim)) * dim ** -0.5
    k, v = rng.normal(size=(2, 1, LENGTH, HEADS, dim))
    if decay == "scalar":
        retnet = np.full((1, LENGTH, 1), np.log1p(-2.0 ** -5))
        log_decay = np.concatenate([retnet, mamba2_log_decay(rng, (1, LENGTH, 1), (1.0, 16.0))], axis=-1)
    else:
        logits = 2.0 * rng.normal(size=(1, LENGTH, HEADS, dim))
        gla = log_sigmoid(logits[..., :dim // 2]) / 16
        hgrn2 = np.logaddexp(np.log(0.3), np.log(0.7) + log_sigmoid(logits[..., dim // 2:]))
        log_decay = np.minimum(np.concatenate([gla, hgrn2], axis=-1), 0.0)
    state = 0.5 * rng.normal(size=(1, HEADS, dim, dim))
    return float32(q, k, v, log_decay, state)


def delta_inputs(seed, dim, decay):
    """q, k, v, beta, log-decay (None without ``decay``), initial state (float32) as DeltaNet and Gated DeltaNet feed
    ``delta_rule``: q and k l2-normalised (q times d^-1/2), beta = sigmoid(x) on head 0 and 2 sigmoid(x)
    (``allow_neg_eigval``) on head 1, Gated DeltaNet's g = -A softplus(x + dt_bias) with A in (0, 16)."""
    rng = np.random.default_rng(seed)
    q, k = (unit(rng.normal(size=(1, LENGTH, HEADS, dim))) for _ in range(2))
    v = rng.normal(size=(1, LENGTH, HEADS, dim))
    beta = 1.0 / (1.0 + np.exp(-rng.normal(size=(1, LENGTH, HEADS)))) * np.array([1.0, 2.0])
    log_decay = np.asarray(mamba2_log_decay(rng, (1, LENGTH, HEADS), (1e-6, 16.0)), np.float32) if decay else None
    state = 0.5 * rng.normal(size=(1, HEADS, dim, dim))
    q, k, v, beta, state = float32(q * dim ** -0.5, k, v, beta, state)
    return q, k, v, beta, log_decay, state


def dplr_inputs(seed, dim):
    """r, k, v, log_w, a, b, initial state (float32) as RWKV-7 makes them (``test_attention_dplr.rwkv_inputs``)."""
    return float32(*rwkv_inputs(seed, b=1, length=LENGTH, h=HEADS, dk=dim, dv=dim))


def bfloat16(*arrays):
    return [jnp.asarray(x, jnp.bfloat16) for x in arrays]


def widened(*arrays):
    return [np.asarray(x).astype(np.float64) for x in arrays]


def scaled_error(got, want):
    """max |got - want| over max |want|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def assert_near(got, want, tolerance, what):
    error = scaled_error(got, want)
    assert error < tolerance, f"{what}: max error {error:.2e} of the reference's scale (tolerance {tolerance:.0e})"


def assert_float32_and_finite(out, final):
    assert out.dtype == final.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))


@pytest.mark.parametrize("decay, dim", [("scalar", 64), ("scalar", 128), ("vector", 64), ("vector", 128)])
def test_gated_linear_at_paper_head_dims_equals_the_float64_recurrence(decay, dim):
    q, k, v, log_decay, state = decayed_inputs(0, dim, decay)
    out, final = chunked(gated_linear)(q, k, v, log_decay, initial_state=state)
    want, want_final = decay_recurrence(q, k, v, log_decay, state)
    assert_near(out, want, FLOAT32_TOLERANCE, "out")
    assert_near(final, want_final, FLOAT32_TOLERANCE, "final state")


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("decay", [False, True], ids=["deltanet", "gated_deltanet"])
def test_delta_rule_at_paper_head_dims_equals_the_float64_recurrence(decay, dim):
    q, k, v, beta, log_decay, state = delta_inputs(1, dim, decay)
    out, final = chunked(delta_rule)(q, k, v, beta, log_decay, initial_state=state)
    want, want_final = delta_recurrence(q, k, v, beta, log_decay, state)
    assert_near(out, want, FLOAT32_TOLERANCE, "out")
    assert_near(final, want_final, FLOAT32_TOLERANCE, "final state")


@pytest.mark.parametrize("dim", [64, 128])
def test_dplr_at_paper_head_dims_equals_the_float64_recurrence(dim):
    *inputs, state = dplr_inputs(2, dim)
    out, final = chunked(dplr)(*inputs, initial_state=state)
    want, want_final = dplr_recurrence(*inputs, state)
    assert_near(out, want, FLOAT32_TOLERANCE, "out")
    assert_near(final, want_final, FLOAT32_TOLERANCE, "final state")


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_gated_linear_with_bfloat16_inputs_stays_near_the_float64_recurrence(decay):
    q, k, v, log_decay, state = decayed_inputs(3, 64, decay)
    q, k, v = bfloat16(q, k, v)
    out, final = chunked(gated_linear)(q, k, v, log_decay, initial_state=state)
    assert_float32_and_finite(out, final)
    want, want_final = decay_recurrence(*widened(q, k, v), log_decay, state)
    assert_near(out, want, BFLOAT16_TOLERANCE, "out")
    assert_near(final, want_final, BFLOAT16_TOLERANCE, "final state")


@pytest.mark.parametrize("decay", [False, True], ids=["deltanet", "gated_deltanet"])
def test_delta_rule_with_bfloat16_inputs_stays_near_the_float64_recurrence(decay):
    q, k, v, beta, log_decay, state = delta_inputs(4, 64, decay)
    q, k, v = bfloat16(q, k, v)
    out, final = chunked(delta_rule)(q, k, v, beta, log_decay, initial_state=state)
    assert_float32_and_finite(out, final)
    want, want_final = delta_recurrence(*widened(q, k, v), beta, log_decay, state)
    assert_near(out, want, BFLOAT16_TOLERANCE, "out")
    assert_near(final, want_final, BFLOAT16_TOLERANCE, "final state")


def test_dplr_with_bfloat16_inputs_stays_near_the_float64_recurrence():
    r, k, v, log_w, a, b, state = dplr_inputs(5, 64)
    r, k, v = bfloat16(r, k, v)
    out, final = chunked(dplr)(r, k, v, log_w, a, b, initial_state=state)
    assert_float32_and_finite(out, final)
    want, want_final = dplr_recurrence(*widened(r, k, v), log_w, a, b, state)
    assert_near(out, want, BFLOAT16_TOLERANCE, "out")
    assert_near(final, want_final, BFLOAT16_TOLERANCE, "final state")

"""The decayed linear-attention core (``effjax.attention.gated_linear``): its three forms against a float64 numpy
token recurrence written from ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, with scalar
(per head) and vector (per key channel) log-decays; packing, padding, carried state, gradients, family identities,
extreme and long inputs, and the one-line errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention import gated_linear as core
from effjax.attention.gated_linear import gated_linear

FORMS = ("recurrent", "parallel", "chunked")
KINDS = ("scalar", "vector")
B, H, DK, DV = 2, 2, 4, 3


@functools.cache
def run(form, chunk_size=16):
    """The core as one jitted function per (form, chunk size), shared by the tests (one compile per shape)."""
    def fn(q, k, v, g, state=None, segment_ids=None, mask=None):
        return gated_linear(q, k, v, g, form=form, chunk_size=chunk_size, initial_state=state,
                            segment_ids=segment_ids, mask=mask)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def inputs(seed, length, kind, b=B, low=0.0, high=1.5):
    """q, k, v, log-decay in [-high, -low] and an initial state, float32 numpy."""
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, b, length, H, DK)).astype(np.float32)
    v = rng.normal(size=(b, length, H, DV)).astype(np.float32)
    g = -rng.uniform(low, high, size=(b, length, H) + ((DK,) if kind == "vector" else ())).astype(np.float32)
    state = rng.normal(size=(b, H, DK, DV)).astype(np.float32)
    return q, k, v, g, state


def recurrence(q, k, v, g, state=None, segment_ids=None, mask=None):
    """float64 token loop from the paper's equations: a new segment id restarts the state from 0; a masked token
    is skipped (state unchanged, output 0). Returns (out [b, l, h, dv], final state [b, h, dk, dv])."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    batch, length, heads, d_k = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    final = np.zeros((batch, heads, d_k, v.shape[-1]))
    for row in range(batch):
        s = np.zeros(final.shape[1:]) if state is None else np.asarray(state[row], np.float64).copy()
        for t in range(length):
            if segment_ids is not None and t > 0 and segment_ids[row, t] != segment_ids[row, t - 1]:
                s = np.zeros_like(s)
            if mask is not None and not mask[row, t]:
                continue
            decay = np.exp(g[row, t])  # [h] or [h, dk]
            decay = decay[:, :, None] if decay.ndim == 2 else decay[:, None, None]
            s = decay * s + np.einsum("hk,hv->hkv", k[row, t], v[row, t])
            out[row, t] = np.einsum("hk,hkv->hv", q[row, t], s)
        final[row] = s
    return out, final


def close(actual, expected, tol=2e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


# A-B-A packs (the id 0 returns after a 1), a one-token segment, and masked tokens inside and at the end.
SEGMENTS_40 = np.array([[0] * 10 + [1] * 5 + [0] * 25,
                        [3] * 7 + [4] + [5] * 20 + [6] * 12])
MASK_40 = np.ones((B, 40), bool)
MASK_40[0, 31:] = False
MASK_40[1, [7, 12, 13]] = False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form, chunk, length", [("recurrent", 16, 40), ("parallel", 16, 40), ("chunked", 16, 40),
                                                 ("chunked", 32, 40),
                                                 pytest.param("chunked", 16, 64, marks=pytest.mark.slow)])
def test_forms_equal_the_float64_recurrence_with_state_segments_and_padding(kind, form, chunk, length):
    q, k, v, g, state = inputs(0, length, kind)
    segments = np.pad(SEGMENTS_40, [(0, 0), (0, length - 40)], mode="edge")
    mask = np.pad(MASK_40, [(0, 0), (0, length - 40)], mode="edge")
    for call in (dict(state=state), dict(state=state, segment_ids=segments, mask=mask)):
        out, final = run(form, chunk)(q, k, v, g, **call)
        ref, ref_final = recurrence(q, k, v, g, **call)
        close(out, ref)
        close(final, ref_final)
        assert out.dtype == final.dtype == jnp.float32


# The forms agree with the float64 recurrence (packing, padding, states included) in the test above; the properties
# below are checked on the form that trains (and the carried state on the one that decodes too).
@pytest.mark.parametrize("kind, form", [("vector", "chunked"), ("scalar", "chunked")])
def test_a_packed_row_equals_its_segments_run_separately(kind, form):
    # A-B-A with 12 tokens each: boundaries inside the 16-token chunks; the initial state belongs to the first run.
    q, k, v, g, state = inputs(1, 36, kind, b=1)
    segments = np.repeat(np.array([[7, 2, 7]]), 12, axis=1)
    out, final = run(form)(q, k, v, g, state, segments)
    for part in range(3):
        cut = slice(12 * part, 12 * (part + 1))
        alone, alone_final = run(form)(q[:, cut], k[:, cut], v[:, cut], g[:, cut],
                                       state if part == 0 else np.zeros_like(state))
        close(out[:, cut], np.asarray(alone, np.float64))
    close(final, np.asarray(alone_final, np.float64))


@pytest.mark.parametrize("form", ["chunked"])
def test_a_right_padded_row_equals_the_unpadded_row_and_pads_leave_the_state(form):
    q, k, v, g, state = inputs(2, 40, "vector", b=1)
    mask = np.arange(40)[None] < 29
    junk = [x.copy() for x in (q, k, v, g)]
    for x in junk:
        x[:, 29:] = 5.0 if x is not junk[3] else -7.0  # garbage at the pads, log-decays still valid
    out, final = run(form)(*junk, state, None, mask)
    real, real_final = run(form)(q[:, :29], k[:, :29], v[:, :29], g[:, :29], state)
    close(out[:, :29], np.asarray(real, np.float64))
    assert np.all(np.asarray(out[:, 29:]) == 0.0)
    close(final, np.asarray(real_final, np.float64))


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_sequence_cut_in_two_and_continued_from_the_returned_state_equals_the_whole(kind, form):
    q, k, v, g, state = inputs(3, 40, kind)
    whole, whole_final = run(form)(q, k, v, g, state=state)
    first, carried = run(form)(q[:, :20], k[:, :20], v[:, :20], g[:, :20], state=state)  # 20: inside a chunk
    second, final = run(form)(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], state=carried)
    close(np.concatenate([first, second], axis=1), np.asarray(whole, np.float64))
    close(final, np.asarray(whole_final, np.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_of_the_three_forms_agree(kind):
    q, k, v, g, state = inputs(4, 40, kind)
    weights = np.random.default_rng(5).normal(size=(B, 40, H, DV))

    def grads(form):
        def loss(q, k, v, g, state):
            out, final = gated_linear(q, k, v, g, form=form, chunk_size=32, initial_state=state,
                                      segment_ids=SEGMENTS_40, mask=MASK_40)
            return jnp.sum(out * weights) + jnp.sum(jnp.sin(final))
        fn = jax.jit(jax.grad(loss, argnums=range(5)), compiler_options={"xla_backend_optimization_level": 0})
        return fn(q, k, v, g, state)

    reference = grads("recurrent")
    assert all(float(jnp.abs(x).sum()) > 0 for x in reference)
    for form in ("parallel", "chunked"):
        for got, want in zip(grads(form), reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_secondary_chunking_equals_the_direct_masked_contraction_in_values_and_gradients():
    # One 64-token chunk in sub-chunks of 16 against the direct [C, C, d_k] fp32 contraction (catalog Sec. 3.2),
    # with runs cutting across sub-chunks and decays down to -1e4 (exponent differences far out of exp's range).
    rng = np.random.default_rng(13)
    q, k = rng.normal(size=(2, 1, 2, 64, H, DK)).astype(np.float32)
    g = np.where(rng.random((1, 2, 64, H, DK)) < 0.05, -1e4, -rng.uniform(0, 2, (1, 2, 64, H, DK)))
    b = np.cumsum(g, axis=2).astype(np.float32)
    runs = np.repeat(np.array([[[0, 1, 2, 2], [0, 0, 0, 0]]]), 16, axis=2) + (np.arange(64) >= 37)
    allowed = np.tril(np.ones((64, 64), bool)) & (runs[..., :, None] == runs[..., None, :])
    weights = np.random.default_rng(14).normal(size=(1, 2, H, 64, 64))

    def direct(q, k, b):
        return jnp.sum(weights * core._scores(q, k, core._pair_weights(b, allowed, True), True))

    def sub_chunked(q, k, b):
        return jnp.sum(weights * core.sub_chunked_scores(q, k, b, allowed, 16))

    np.testing.assert_allclose(core.sub_chunked_scores(q, k, b, allowed, 16),
                               core._scores(q, k, core._pair_weights(b, allowed, True), True), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(fn, argnums=(0, 1, 2))(q, k, b) for fn in (direct, sub_chunked)]
    for got, want in zip(grads[1], grads[0], strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_no_decay_is_causal_linear_attention(kind):
    # g = 0: o_i = sum_{j <= i} (q_i . k_j) v_j + q_i^T S_0 (catalog Sec. 3.1/3.2: gamma -> 1, alpha = 1).
    q, k, v, g, state = inputs(6, 40, kind)
    scores = np.tril(np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k))
    expected = np.einsum("bhij,bjhv->bihv", scores, v) + np.einsum("bihd,bhdv->bihv", q, state)
    out, final = run("chunked")(q, k, v, np.zeros_like(g), state)
    close(out, expected, 1e-4)
    close(final, state + np.einsum("bjhd,bjhv->bhdv", k.astype(np.float64), v), 1e-4)


def test_a_vector_decay_constant_over_the_key_channels_equals_the_scalar_decay():
    q, k, v, g, state = inputs(7, 40, "scalar")
    scalar = run("chunked")(q, k, v, g, state)
    vector = run("chunked")(q, k, v, np.repeat(g[..., None], DK, axis=-1), state)
    for a, b in zip(scalar, vector, strict=True):
        close(a, np.asarray(b, np.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_decays_one_token_segments_and_length_one_stay_finite_and_exact(kind):
    q, k, v, g, state = inputs(8, 40, kind)
    g = np.where(np.random.default_rng(9).random(g.shape) < 0.5, -1e4, -1e-7).astype(np.float32)
    segments = np.arange(40)[None].repeat(B, 0) // np.array([[1], [3]])  # one-token runs; three-token runs
    for call in (dict(segment_ids=segments), dict()):
        out, final = run("chunked")(q, k, v, g, state, **call)
        ref, ref_final = recurrence(q, k, v, g, state, **call)
        close(out, ref)
        close(final, ref_final)
    grads = jax.grad(lambda *a: jnp.sum(run("chunked")(*a)[0]), argnums=range(5))(q, k, v, g, state)
    assert all(np.all(np.isfinite(x)) for x in grads)
    one = [x[:, :1] for x in (q, k, v, g)]
    for form in FORMS:
        out, final = run(form)(*one, state)
        ref, ref_final = recurrence(*one, state)
        close(out, ref)
        close(final, ref_final)


def long_gates(kind, length, seed=10):
    """Log-decays drawn as the methods draw them: Mamba2's dt A (scalar, A in [-16, -1]) or GLA's
    logsigmoid(x) / 16 mixed with HGRN2's log(gamma + (1 - gamma) sigmoid(x)) per key channel (vector)."""
    keys = jax.random.split(jax.random.key(seed), 2)
    if kind == "scalar":
        dt = jax.nn.softplus(jax.random.normal(keys[0], (1, length, 1)) - 4.0)
        return dt * -jax.random.uniform(keys[1], (1, 1, 1), minval=1.0, maxval=16.0)
    logits = 3.0 * jax.random.normal(keys[0], (1, length, 1, 4))
    gla = jax.nn.log_sigmoid(logits[..., :2]) / 16
    hgrn2 = jnp.logaddexp(jnp.log(0.3), jnp.log(0.7) + jax.nn.log_sigmoid(logits[..., 2:]))
    return jnp.minimum(jnp.concatenate([gla, hgrn2], axis=-1), 0.0)


def check_long_input_is_bounded(kind, length):
    keys = jax.random.split(jax.random.key(11), 3)
    q, k = (jax.random.normal(kk, (1, length, 1, 4)) for kk in keys[:2])
    v = jax.random.normal(keys[2], (1, length, 1, 4))
    out, final = run("chunked", 64)(q, k, v, long_gates(kind, length))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))
    # |S| <= max|k v^T| / (1 - the largest decay): the state cannot grow without bound.
    assert float(jnp.abs(final).max()) < 1e4


@pytest.mark.parametrize("kind", KINDS)
def test_a_long_input_keeps_the_chunked_state_finite(kind):
    check_long_input_is_bounded(kind, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_64k_token_input_keeps_the_chunked_state_finite(kind):
    check_long_input_is_bounded(kind, 65536)


def test_bad_inputs_raise_one_line_errors_naming_the_method():
    q, k, v, g, state = inputs(12, 8, "scalar")
    call = functools.partial(gated_linear, method="retnet")
    cases = [
        (lambda: call(q, k, v, g, form="loop"), "form must be one of"),
        (lambda: call(q, k, v, g, chunk_size=24), "chunk_size must be a power of two"),
        (lambda: call(q, k, v, g, initial_state=state[:, :1]), "initial_state must be float32"),
        (lambda: call(q, k, v, g, initial_state=state.astype(np.float16)), "initial_state must be float32"),
        (lambda: call(q, k, v, np.abs(g)), "log_decay must be finite and <= 0"),
        (lambda: call(q, k, v, np.full_like(g, -np.inf)), "log_decay must be finite and <= 0"),
        (lambda: call(q, k, v, g[..., :1]), "log_decay must have shape"),
        (lambda: call(q, k[:, :4], v, g), "q and k must have the same shape"),
        (lambda: call(q, k, v[:, :4], g), "v must have shape"),
        (lambda: call(q, k, v.astype(np.int32), g), "v must be a float array"),
        (lambda: call(q, k, v, g, mask=np.ones((B, 9), bool)), "mask must have shape"),
        (lambda: call(q, k, v, g, segment_ids=np.ones((1, 8), int)), "segment_ids must have shape"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            fn()
        assert str(err.value).startswith("retnet: ") and "\n" not in str(err.value)

"""The DPLR core (``effjax.attention.dplr``): its three forms against a float64 token loop written from RWKV-7's
official equations (state ``[d_v, d_k]``), packing, padding, carried state, gradients, the family identities
(catalog Sec. 3.6: a = 0 is vector-decay linear attention, w = 1 on top plain linear attention, a = -k, b = k
with unit keys DeltaNet with beta = 1), long-input boundedness and the one-line errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention.dplr import dplr

B, L, H, DK, DV = 2, 40, 2, 8, 6  # L = 40: chunks of 16 and 32 do not divide it
DECAY_SCALE = np.exp(-0.5)  # RWKV-7: log w = -e^-0.5 sigmoid(.) >= -0.6065


@functools.cache
def compiled(form, chunk_size=16):
    """The jitted core for one form (XLA's backend optimisations off: they cost most of the CPU time here)."""
    fn = functools.partial(dplr, form=form, chunk_size=chunk_size)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


FORMS = [("recurrent", 16), ("parallel", 16), ("chunked", 16), ("chunked", 32), ("chunked", 64)]
# Packing, padding and the carried state on the form that decodes and the one that trains (the parallel form is the
# chunked code with one chunk); the identities on the form that trains.
CHUNKED = [("chunked", 16)]
TWO = [("recurrent", 16), ("chunked", 16)]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rwkv_inputs(seed, b=B, length=L, h=H, dk=DK, dv=DV, spread=2.0):
    """r, k, v, log_w, a, b, initial state (float64) shaped as RWKV-7 makes them: w in its official range,
    a = -kappa (unit removal key), b = alpha * kappa with the in-context rate alpha in (0, 1), k the write key."""
    rng = np.random.default_rng(seed)
    shape = (b, length, h, dk)
    r, key = rng.normal(size=shape), rng.normal(size=shape)
    v = rng.normal(size=(b, length, h, dv))
    log_w = -DECAY_SCALE * sigmoid(spread * rng.normal(size=shape))
    kappa = rng.normal(size=shape)
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    alpha = sigmoid(rng.normal(size=shape))
    write = key * (1.0 + (alpha - 1.0) * 1.02)
    state = 0.5 * rng.normal(size=(b, h, dk, dv))
    return r, write, v, log_w, -kappa, alpha * kappa, state


def reference(r, k, v, log_w, a, b, state=None, segments=None, mask=None):
    """Token loop in float64, official layout ``S [d_v, d_k]``: ``S_t = S_{t-1} (Diag(w_t) + a_t b_t^T) + v_t k_t^T``,
    ``y_t = S_t r_t``; pads (mask False) skipped with output 0, the state zeroed where the segment id changes.
    Returns (out [b, l, h, d_v], final state in effjax's layout [b, h, d_k, d_v])."""
    r, k, v, log_w, a, b = (np.asarray(x, np.float64) for x in (r, k, v, log_w, a, b))
    batch, length, heads, d_k = k.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    final = np.zeros((batch, heads, d_k, v.shape[-1]))
    for row in range(batch):
        for h in range(heads):
            s = np.zeros((v.shape[-1], d_k)) if state is None else np.asarray(state, np.float64)[row, h].T.copy()
            for t in range(length):
                if segments is not None and t > 0 and segments[row, t] != segments[row, t - 1]:
                    s = np.zeros_like(s)
                if mask is not None and not mask[row, t]:
                    continue
                w = np.exp(log_w[row, t, h])
                s = s * w[None, :] + np.outer(s @ a[row, t, h], b[row, t, h]) + np.outer(v[row, t, h], k[row, t, h])
                out[row, t, h] = s @ r[row, t, h]
            final[row, h] = s.T
    return out, final


def f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def close(actual, expected, tol=1e-4):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("form,chunk_size", FORMS)
def test_forms_match_the_float64_token_loop(form, chunk_size):
    *inputs, state = rwkv_inputs(0)
    out, final = compiled(form, chunk_size)(*f32(*inputs), initial_state=f32(state)[0])
    expected_out, expected_final = reference(*inputs, state)
    assert out.dtype == final.dtype == jnp.float32
    close(out, expected_out)
    close(final, expected_final)


# An A-B-A pack (ids repeat after a gap: three runs), one-token runs, and a row with its own ids.
SEGMENTS = np.array([[3] * 10 + [8] * 17 + [3] * 11 + [5, 6],
                     [0] * 16 + [1] * 16 + [2] * 8])


def separate_runs(inputs, state, segments):
    """Each run through the float64 loop on its own (the initial state only for the first), concatenated."""
    outs, finals = [], []
    for row in range(segments.shape[0]):
        edges = [0, *np.flatnonzero(np.diff(segments[row]) != 0) + 1, segments.shape[1]]
        pieces = []
        for index, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            first = state[row:row + 1] if index == 0 else None
            out, final = reference(*(x[row:row + 1, start:stop] for x in inputs), first)
            pieces.append(out)
        outs.append(np.concatenate(pieces, axis=1))
        finals.append(final)
    return np.concatenate(outs), np.concatenate(finals)


@pytest.mark.parametrize("form,chunk_size", TWO)
def test_packed_segments_equal_separate_runs(form, chunk_size):
    *inputs, state = rwkv_inputs(1)
    out, final = compiled(form, chunk_size)(*f32(*inputs), initial_state=f32(state)[0],
                                            segment_ids=jnp.asarray(SEGMENTS))
    expected_out, expected_final = separate_runs(inputs, state, SEGMENTS)
    close(out, expected_out)
    close(final, expected_final)


@pytest.mark.parametrize("form,chunk_size", TWO)
def test_padding_equals_the_row_without_pads(form, chunk_size):
    *inputs, state = rwkv_inputs(2)
    mask = np.ones((B, L), bool)
    mask[0, 29:] = False  # right padding
    mask[1, [3, 17, 18, 33]] = False  # holes: pads anywhere leave the state unchanged
    out, final = compiled(form, chunk_size)(*f32(*inputs), initial_state=f32(state)[0], mask=jnp.asarray(mask))
    for row in range(B):
        real = [x[row:row + 1, mask[row]] for x in inputs]
        expected_out, expected_final = reference(*real, state[row:row + 1])
        close(out[row:row + 1, mask[row]], expected_out)
        close(final[row:row + 1], expected_final)
    assert np.all(np.asarray(out)[~mask] == 0.0)


@pytest.mark.parametrize("form,chunk_size", FORMS[:3])
def test_a_sequence_continues_from_the_returned_state(form, chunk_size):
    *inputs, state = rwkv_inputs(3)
    inputs = f32(*inputs)
    segments = jnp.asarray(SEGMENTS)
    run = compiled(form, chunk_size)
    whole, whole_final = run(*inputs, initial_state=f32(state)[0], segment_ids=segments)
    cut = 23  # inside a run and not on a chunk boundary
    first, middle = run(*(x[:, :cut] for x in inputs), initial_state=f32(state)[0], segment_ids=segments[:, :cut])
    second, final = run(*(x[:, cut:] for x in inputs), initial_state=middle, segment_ids=segments[:, cut:])
    close(jnp.concatenate([first, second], axis=1), np.asarray(whole, np.float64), 1e-5)
    close(final, np.asarray(whole_final, np.float64), 1e-5)


def test_gradients_of_the_three_forms_agree():
    *inputs, state = rwkv_inputs(4, length=24)
    inputs, state = f32(*inputs), f32(state)[0]
    rng = np.random.default_rng(5)
    weights_out = jnp.asarray(rng.normal(size=(B, 24, H, DV)), jnp.float32)
    weights_state = jnp.asarray(rng.normal(size=(B, H, DK, DV)), jnp.float32)
    segments = jnp.asarray(SEGMENTS[:, 16:])  # runs crossing the chunk boundary at 16
    mask = jnp.asarray(np.arange(24)[None, :] < np.array([[20], [24]]))

    def loss(form, chunk_size, *args):
        out, final = dplr(*args[:6], form=form, chunk_size=chunk_size, initial_state=args[6],
                          segment_ids=segments, mask=mask)
        return jnp.sum(out * weights_out) + jnp.sum(final * weights_state)

    grads = {form: jax.jit(jax.grad(functools.partial(loss, form, chunk), argnums=tuple(range(7))),
                           compiler_options={"xla_backend_optimization_level": 0})(*inputs, state)
             for form, chunk in (("chunked", 16), ("parallel", 16), ("recurrent", 16))}
    for name, expected in zip(("r", "k", "v", "log_w", "a", "b", "state"), grads["recurrent"], strict=True):
        assert np.all(np.isfinite(expected)), name
        assert float(jnp.abs(expected).max()) > 0, name
        for form in ("chunked", "parallel"):
            close(grads[form][("r", "k", "v", "log_w", "a", "b", "state").index(name)],
                  np.asarray(expected, np.float64), 2e-4)


def decay_only_loop(r, k, v, log_w):
    """a = b = 0: vector-decay linear attention (GLA), ``S_t = Diag(w_t) S_{t-1} + k_t v_t^T``, S [d_k, d_v]."""
    batch, length, heads, d_k = k.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for row in range(batch):
        for h in range(heads):
            s = np.zeros((d_k, v.shape[-1]))
            for t in range(length):
                s = np.exp(log_w[row, t, h])[:, None] * s + np.outer(k[row, t, h], v[row, t, h])
                out[row, t, h] = s.T @ r[row, t, h]
    return out


@pytest.mark.parametrize("form,chunk_size", CHUNKED)
def test_no_removal_is_vector_decay_linear_attention(form, chunk_size):
    r, k, v, log_w, a, _, _ = rwkv_inputs(6)
    zero = np.zeros_like(a)
    out, _ = compiled(form, chunk_size)(*f32(r, k, v, log_w, zero, zero))
    close(out, decay_only_loop(r, k, v, log_w))
    # w = 1 on top: plain causal linear attention, (R K^T o M) V.
    out, _ = compiled(form, chunk_size)(*f32(r, k, v, np.zeros_like(log_w), zero, zero))
    scores = np.einsum("bthd,bshd->bhts", r, k) * np.tril(np.ones((L, L)))
    close(out, np.einsum("bhts,bshv->bthv", scores, v))


@pytest.mark.parametrize("form,chunk_size", CHUNKED)
def test_unit_keys_with_a_equal_minus_b_equal_k_are_deltanet(form, chunk_size):
    r, _, v, _, _, _, _ = rwkv_inputs(7)
    k = np.random.default_rng(8).normal(size=r.shape)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    expected = np.zeros_like(v)
    for row in range(B):
        for h in range(H):
            s = np.zeros((DK, DV))
            for t in range(L):  # DeltaNet, beta = 1: S <- S + k (v - S^T k)^T
                s = s + np.outer(k[row, t, h], v[row, t, h] - s.T @ k[row, t, h])
                expected[row, t, h] = s.T @ r[row, t, h]
    run = compiled(form, chunk_size)
    out, _ = run(*f32(r, k, v, np.zeros_like(k), -k, k))
    close(out, expected)
    recalled, _ = run(*f32(k, k, v, np.zeros_like(k), -k, k))  # beta = 1 with unit keys recalls exactly
    close(recalled, v)


def test_extreme_decays_and_single_tokens_stay_finite():
    *inputs, state = rwkv_inputs(9, length=L)
    inputs[3] = np.where(np.random.default_rng(10).random(inputs[3].shape) < 0.5, -1e4, -1e-7)
    singles = np.arange(L)[None, :].repeat(B, axis=0)  # every token its own segment
    for form, chunk_size in FORMS[:3]:
        out, final = compiled(form, chunk_size)(*f32(*inputs), initial_state=f32(state)[0],
                                                segment_ids=jnp.asarray(singles))
        expected_out, expected_final = reference(*inputs, state, singles)
        close(out, expected_out)
        close(final, expected_final)
    one = [x[:, :1] for x in inputs]
    for form, chunk_size in FORMS[:3]:
        out, _ = compiled(form, chunk_size)(*f32(*one), initial_state=f32(state)[0])
        close(out, reference(*one, state)[0])


def test_the_chunked_state_stays_bounded_over_64k_tokens():
    # Decays over the whole official range (sigmoid of 4 N(0, 1)), unit removal keys, rates in (0, 1).
    r, k, v, log_w, a, b, _ = rwkv_inputs(11, b=1, length=65536, h=1, dk=4, dv=4, spread=4.0)
    out, final = compiled("chunked", 16)(*f32(r, k, v, log_w, a, b))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))
    assert float(jnp.abs(final).max()) < 100.0


def bad_calls():
    *inputs, _ = rwkv_inputs(12, length=8)
    r, k, v, log_w, a, b = f32(*inputs)
    good = dict(r=r, k=k, v=v, log_w=log_w, a=a, b=b)
    yield "form", dict(good, form="blocked")
    yield "chunk_size", dict(good, chunk_size=12)
    yield "chunk_size", dict(good, chunk_size=0)
    yield "initial_state", dict(good, initial_state=jnp.zeros((B, H, DV, DK)))
    yield "initial_state", dict(good, initial_state=jnp.zeros((B, H, DK, DV), jnp.bfloat16))
    yield "a must have", dict(good, a=a[..., :4])
    yield "v must have", dict(good, v=v[:, :5])
    yield "r must be", dict(good, r=r[0])
    yield "k must be", dict(good, k=k.astype(jnp.int32))
    yield "log_w must be", dict(good, log_w=-log_w)
    yield "log_w must be", dict(good, log_w=log_w.at[0, 0, 0, 0].set(-jnp.inf))
    yield "mask", dict(good, mask=jnp.ones((B, 7), bool))
    yield "segment_ids", dict(good, segment_ids=jnp.ones((B, 9), int))


@pytest.mark.parametrize("what,call", list(bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_give_one_line_errors(what, call):
    with pytest.raises(ValueError) as error:
        dplr(**call, method="mine")
    message = str(error.value)
    assert message.startswith("mine: ") and what in message and "\n" not in message

"""The delta-rule core (``effjax.attention.delta_rule``) against a float64 numpy token loop written from the
papers' equations, S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and o_t = S_t^T q_t: the three
forms agree with it and with each other (values, final states, gradients), packing equals separate runs, padding
equals the row without its pads, a state carried across a cut equals the whole, the identities of catalog
Sec. 3.3/3.4, a bounded state over a long sequence, and one-line errors for bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention.delta_rule import delta_rule

B, L, H, D = 2, 40, 2, 8  # L = 40: the chunks of 16 and 32 do not divide it
FORMS = [("recurrent", 16), ("parallel", 16), ("chunked", 16), ("chunked", 32)]
# The forms agree with the float64 recurrence (packing, padding, states included) in the first test; the properties
# after it are checked on the form that trains (and the carried state on the one that decodes too).
CHUNKED = [("chunked", 16)]
TOL = dict(rtol=1e-4, atol=2e-5)
# Runs of every length around the chunks of 16: an A-B-A pack (ids repeat: the third run must not reconnect to the
# first), a run across the first chunk boundary, one-token runs, and a padded tail in row 0.
SEGMENTS = np.array([[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 3, 3, 3,
                      3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
                     [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                      2, 2, 2, 2, 2, 2, 2, 2, 7, 8]])
MASK = np.ones((B, L), bool)
MASK[0, 33:] = False  # a padded tail
MASK[1, [3, 17, 18]] = False  # pads inside runs, one of them across the chunk boundary at 16


@functools.cache
def core(form, chunk):
    """The core in one form, jitted without XLA's backend optimisations (they cost most of these tests' time)."""
    def run(q, k, v, beta, log_decay, initial_state, segment_ids, mask):
        return delta_rule(q, k, v, beta, log_decay, form=form, chunk_size=chunk, initial_state=initial_state,
                          segment_ids=segment_ids, mask=mask)
    return jax.jit(run, compiler_options={"xla_backend_optimization_level": 0})


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def inputs(seed, length=L, decay=True):
    """q, k (unit), v, beta in (0, 1), log-decays in [-0.5, 0] (None without decay) and an initial state."""
    rng = np.random.default_rng(seed)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    q, k, v = (rng.normal(size=(B, length, H, D)) for _ in range(3))
    return dict(q=f32(q), k=f32(unit(k)), v=f32(v), beta=f32(rng.uniform(0, 1, (B, length, H))),
                log_decay=f32(-rng.uniform(0, 0.5, (B, length, H))) if decay else None,
                initial_state=f32(rng.normal(size=(B, H, D, D))))


def call(form, chunk, x, segment_ids=None, mask=None):
    """The core on ``x``; absent options are passed as their neutral arrays, so that one trace serves them all."""
    batch, length = x["k"].shape[:2]
    state = np.zeros((batch, H, D, D), np.float32) if x["initial_state"] is None else x["initial_state"]
    segment_ids = np.zeros((batch, length), int) if segment_ids is None else segment_ids
    mask = np.ones((batch, length), bool) if mask is None else mask
    return core(form, chunk)(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], state, segment_ids, mask)


def reference(q, k, v, beta, log_decay=None, initial_state=None, segment_ids=None, mask=None):
    """The token recurrence in float64, one batch row and head at a time, from the equations only."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    g = np.zeros(beta.shape) if log_decay is None else np.asarray(log_decay, np.float64)
    batch, _, heads, d_k = k.shape
    states = np.zeros((batch, heads, d_k, v.shape[-1])) if initial_state is None else np.array(initial_state,
                                                                                                np.float64)
    out = np.zeros(v.shape)
    for row in range(q.shape[0]):
        for head in range(q.shape[2]):
            s = states[row, head]
            for t in range(q.shape[1]):
                if segment_ids is not None and t > 0 and segment_ids[row, t] != segment_ids[row, t - 1]:
                    s = np.zeros_like(s)
                if mask is not None and not mask[row, t]:
                    continue
                kt = k[row, t, head]
                transition = np.exp(g[row, t, head]) * (np.eye(len(kt)) - beta[row, t, head] * np.outer(kt, kt))
                s = transition @ s + beta[row, t, head] * np.outer(kt, v[row, t, head])
                out[row, t, head] = s.T @ q[row, t, head]
            states[row, head] = s
    return out, states


def assert_close(got, want, **tol):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **{**TOL, **tol})


@pytest.mark.parametrize("form,chunk", FORMS)
@pytest.mark.parametrize("case", ["delta", "gated_packed_padded", "extreme"])
def test_each_form_equals_the_float64_recurrence(form, chunk, case):
    x = inputs(0, decay=case != "delta")
    segments = mask = None
    if case != "delta":
        segments, mask = SEGMENTS, MASK
    if case == "extreme":  # log-decays at -1e4 and near 0, beta up to 2, one-token runs everywhere in row 1
        x["log_decay"] = np.where(np.arange(L) % 3 == 0, -1e4, -1e-7)[None, :, None].repeat(B, 0).repeat(H, 2)
        x["log_decay"] = x["log_decay"].astype(np.float32)
        x["beta"] = 2 * x["beta"]
        segments = SEGMENTS.copy()
        segments[1, 20:30] = np.arange(10)
    out, state = call(form, chunk, x, segments, mask)
    want_out, want_state = reference(**x, segment_ids=segments, mask=mask)
    assert_close(out, want_out)
    assert_close(state, want_state)
    if mask is not None:
        assert np.all(np.asarray(out)[~mask] == 0)


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_packed_runs_equal_the_runs_computed_separately(form, chunk):
    x = inputs(1)
    out, state = call(form, chunk, x, SEGMENTS)
    for row in range(B):
        cuts = [0, *np.flatnonzero(np.diff(SEGMENTS[row])) + 1, L]
        for run, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            piece = {name: x[name][row:row + 1, start:stop] for name in ("q", "k", "v", "beta", "log_decay")}
            initial = x["initial_state"][row:row + 1] if run == 0 else None  # it belongs to the first run only
            want_out, want_state = reference(**piece, initial_state=initial)
            assert_close(out[row:row + 1, start:stop], want_out)
        assert_close(state[row:row + 1], want_state[:1])


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_padding_equals_the_row_without_its_pads(form, chunk):
    x = inputs(2)
    mask = np.ones((B, L), bool)
    mask[:, [0, 5, 15, 16, 17]] = False  # pads at the start, inside chunks and across the boundary at 16
    mask[:, 37:] = False
    noisy = {**x, **{name: np.where(mask[..., None, None], x[name], 7.0) for name in ("q", "k", "v")}}
    noisy["beta"] = np.where(mask[..., None], x["beta"], 0.9)
    noisy["log_decay"] = np.where(mask[..., None], x["log_decay"], -3.0)
    out, state = call(form, chunk, noisy, mask=mask)
    kept = {**x, **{name: x[name][:, mask[0]] for name in ("q", "k", "v", "beta", "log_decay")}}
    want_out, want_state = call(form, chunk, kept)
    assert_close(out[:, mask[0]], np.asarray(want_out, np.float64), atol=1e-6)
    assert_close(state, np.asarray(want_state, np.float64), atol=1e-6)
    assert np.all(np.asarray(out)[:, ~mask[0]] == 0)


@pytest.mark.parametrize("form,chunk", [("recurrent", 16), ("chunked", 16)])
def test_a_state_carried_across_a_cut_equals_the_whole(form, chunk):
    x = inputs(3)
    whole_out, whole_state = call(form, chunk, x)
    cut = L // 2  # 20: not a multiple of either chunk

    def part(sl, state):
        return {**{name: x[name][:, sl] for name in ("q", "k", "v", "beta", "log_decay")}, "initial_state": state}

    first_out, first_state = call(form, chunk, part(slice(0, cut), x["initial_state"]))
    second_out, second_state = call(form, chunk, part(slice(cut, L), first_state))
    assert_close(np.concatenate([first_out, second_out], axis=1), np.asarray(whole_out, np.float64), atol=1e-5)
    assert_close(second_state, np.asarray(whole_state, np.float64), atol=1e-5)


@functools.cache
def gradients(form, chunk):
    """Gradients of a random projection of (out, final state) w.r.t. q, k, v, beta, log-decays, initial state."""
    cotangents = [jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate([(B, L, H, D), (B, H, D, D)])]

    def loss(q, k, v, beta, log_decay, initial_state):
        out, state = delta_rule(q, k, v, beta, log_decay, form=form, chunk_size=chunk, initial_state=initial_state,
                                segment_ids=SEGMENTS, mask=MASK)
        return jnp.sum(out * cotangents[0]) + jnp.sum(state * cotangents[1])

    return jax.jit(jax.grad(loss, argnums=range(6)), compiler_options={"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("form,chunk", [("parallel", 16), ("chunked", 16)])
def test_gradients_of_the_forms_agree(form, chunk):
    x = inputs(4)
    args = [x[name] for name in ("q", "k", "v", "beta", "log_decay", "initial_state")]
    want = gradients("recurrent", 16)(*args)
    got = gradients(form, chunk)(*args)
    for name, g, w in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), got, want, strict=True):
        assert np.all(np.isfinite(g)), name
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, scale), err_msg=name)


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_zero_write_strength_leaves_the_state_or_only_decays_it(form, chunk):
    for decay in (False, True):
        x = {**inputs(5, decay=decay), "beta": np.zeros((B, L, H), np.float32)}
        out, state = call(form, chunk, x)
        b = np.zeros((B, L, H)) if not decay else np.cumsum(x["log_decay"].astype(np.float64), axis=1)
        s0 = x["initial_state"].astype(np.float64)
        assert_close(out, np.exp(b)[..., None] * np.einsum("blhk,bhkv->blhv", x["q"], s0))
        assert_close(state, np.exp(b[:, -1])[..., None, None] * s0)


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_writing_what_is_stored_leaves_the_state_unchanged(form, chunk):
    x = inputs(6, decay=False)
    s0 = x["initial_state"]
    x["v"] = np.einsum("blhk,bhkv->blhv", x["k"], s0).astype(np.float32)  # v_t = S_{t-1}^T k_t, for any beta
    out, state = call(form, chunk, x)
    assert_close(state, s0.astype(np.float64))
    assert_close(out, np.einsum("blhk,bhkv->blhv", x["q"], s0.astype(np.float64)))


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_orthogonal_keys_give_decayed_linear_attention_of_beta_v(form, chunk):
    # One-hot keys, distinct inside each run of 8 tokens (runs of <= d_k tokens keep them orthogonal): within a run
    # o_t = sum_{j <= t} exp(b_t - b_j) (q_t . k_j) beta_j v_j, from a zero state.
    x = {**inputs(7), "initial_state": None}
    x["k"] = np.broadcast_to(np.eye(D, dtype=np.float32)[np.arange(L) % D][None, :, None], (B, L, H, D)).copy()
    segments = np.broadcast_to(np.arange(L) // D, (B, L))
    out, _ = call(form, chunk, x, segments)
    b = np.cumsum(x["log_decay"].astype(np.float64), axis=1)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (np.arange(L)[:, None] >= np.arange(L)[None, :])
    weights = np.einsum("bthd,bjhd->bhtj", x["q"], x["k"]) * np.where(
        allowed[:, None], np.exp(np.minimum(b.transpose(0, 2, 1)[..., :, None] - b.transpose(0, 2, 1)[..., None, :],
                                            0.0)), 0.0)
    assert_close(out, np.einsum("bhtj,bjhd->bthd", weights, x["beta"][..., None] * x["v"]))


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_unit_strength_with_unit_keys_recalls_exactly(form, chunk):
    x = {**inputs(8, decay=False), "beta": np.ones((B, L, H), np.float32)}
    x["q"] = x["k"]  # o_t = S_t^T k_t = v_t
    out, _ = call(form, chunk, x)
    assert_close(out, x["v"].astype(np.float64))


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_strength_two_with_zero_values_is_a_reflection(form, chunk):
    x = {**inputs(9, decay=False), "beta": np.full((B, L, H), 2.0, np.float32), "v": np.zeros((B, L, H, D),
                                                                                             np.float32)}
    _, state = call(form, chunk, x)
    assert_close(np.linalg.norm(state, axis=(-2, -1)), np.linalg.norm(x["initial_state"], axis=(-2, -1)))
    assert not np.allclose(state, x["initial_state"], atol=1e-2)


@pytest.mark.parametrize("form,chunk", CHUNKED)
def test_zero_log_decay_is_deltanet_exactly(form, chunk):
    x = inputs(10)
    x["log_decay"] = np.zeros((B, L, H), np.float32)
    gated = call(form, chunk, x, SEGMENTS, MASK)
    plain = call(form, chunk, {**x, "log_decay": None}, SEGMENTS, MASK)
    for got, want in zip(gated, plain, strict=True):
        np.testing.assert_array_equal(got, want)


def long_inputs(length, decay):
    """One head of random unit keys and the methods' gates: GDN's decay and beta in (0, 2) (negative eigenvalues)."""
    keys = jax.random.split(jax.random.key(11), 6)
    q, k, v = (jax.random.normal(kk, (1, length, 1, 8)) for kk in keys[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = 2 * jax.nn.sigmoid(jax.random.normal(keys[3], (1, length, 1)))
    log_decay = None
    if decay:
        a = jax.random.uniform(keys[4], (1,), minval=1e-6, maxval=16.0)
        dt_bias = jnp.log(jnp.expm1(0.01))
        log_decay = -a * jax.nn.softplus(jax.random.normal(keys[5], (1, length, 1)) + dt_bias)
    return q, k, v, beta, log_decay


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("length", [2048, pytest.param(65536, marks=pytest.mark.slow)])
def test_the_chunked_state_stays_finite_over_a_long_sequence(length, decay):
    run = jax.jit(lambda *a: delta_rule(*a, form="chunked", chunk_size=64),
                  compiler_options={"xla_backend_optimization_level": 0})
    out, state = run(*long_inputs(length, decay))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state))
    assert float(jnp.abs(state).max()) < 1e3


def bad_calls():
    x = inputs(12)
    ok = dict(q=x["q"], k=x["k"], v=x["v"], beta=x["beta"], log_decay=x["log_decay"])
    return [
        (dict(form="fused"), "form"),
        (dict(chunk_size=48), "chunk_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(initial_state=np.zeros((B, H, D, D), np.float64)), "initial_state"),
        (dict(initial_state=np.zeros((B, H, D, D + 1), np.float32)), "initial_state"),
        (dict(q=x["q"][0]), "q"),
        (dict(q=x["q"][..., :4]), "q and k"),
        (dict(v=x["v"][:, :4]), "q and k"),
        (dict(beta=x["beta"][..., None]), "beta"),
        (dict(log_decay=x["log_decay"][:, :4]), "log_decay"),
        (dict(log_decay=-x["log_decay"]), "log_decay must be finite and <= 0"),
        (dict(mask=np.ones((B, L + 1), bool)), "mask"),
        (dict(segment_ids=np.zeros((B, 3), int)), "segment_ids"),
    ], ok


def test_bad_inputs_give_one_line_errors_naming_the_method_and_argument():
    cases, ok = bad_calls()
    for change, argument in cases:
        kwargs = {**ok, **change}
        with pytest.raises(ValueError) as err:
            delta_rule(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("beta"), kwargs.pop("log_decay"),
                       method="my_method", **kwargs)
        message = str(err.value)
        assert message.startswith("my_method: ") and argument in message and "\n" not in message, (change, message)

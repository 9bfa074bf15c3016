"""The decayed linear-attention methods (``retnet``, ``gla``, ``hgrn2``, ``mamba2``) against float64 numpy
references written from their papers' equations: parameterisation ranges and inits, the family identities at method
level, RetNet's symmetric and HGRN2's official bidirectional forms, carried state, and the refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_gated_linear import recurrence

from effjax import attention
from effjax.attention import gla, hgrn2, mamba2, retnet

B, L, H, D = 2, 40, 2, 4
SEGMENTS = np.array([[5] * 9 + [6] * 6 + [5] * 25, [1] * 40])  # A-B-A in row 0
MASK = np.arange(L)[None] < np.array([[33], [L]])  # row 0 right-padded


def fast(fn, **kw):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


@functools.cache
def attend_fn(module, **static):
    """``module.attend`` jitted with its static keywords, shared by the tests."""
    return fast(lambda q, k, v, params, mask=None, segment_ids=None, **dynamic: module.attend(
        q, k, v, params, mask=mask, segment_ids=segment_ids, **static, **dynamic))


def qkv(seed, length=L, b=B, scale=1.0):
    rng = np.random.default_rng(seed)
    return [scale * rng.normal(size=(b, length, H, D)).astype(np.float32) for _ in range(3)]


def init(name, q=None, k=None, v=None, **fields):
    """The method's initial params (numpy, a fresh copy); they depend on the heads and head dim only."""
    return jax.tree.map(np.array, _init(name, tuple(sorted(fields.items()))))


@functools.cache
def _init(name, fields):
    one = jnp.ones((1, 1, H, D))  # a one-token call: the params' shapes need only the heads and the head dim
    return attention.make(name, **dict(fields)).init(jax.random.key(0), one, one, one, causal=True)["params"]


def f64(x):
    return np.asarray(x, np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def rms_norm(x, weight, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def close(actual, expected, tol=3e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def runs_of(segments, b=B, length=L):
    if segments is None:
        return np.zeros((b, length), int)
    return np.concatenate([np.zeros((b, 1), int), np.cumsum(segments[:, 1:] != segments[:, :-1], axis=1)], axis=1)


def masked_rows(x, mask):
    return x if mask is None else np.where(mask[:, :, None, None], x, 0.0)


def bidirectional(one_direction, q, k, v, segments, mask, *extra):
    """Forward plus flipped forward-of-the-flipped inputs (every argument flipped along the length)."""
    def flip(x):
        return None if x is None else np.flip(x, axis=1)
    return one_direction(q, k, v, segments, mask, *extra) + flip(
        one_direction(*map(flip, (q, k, v, segments, mask)), *map(flip, extra)))


# --- retnet ------------------------------------------------------------------------------------------------

def test_retnet_decays_are_one_minus_two_to_the_minus_five_minus_h():
    # Relative to log gamma itself, so the tiny decays of late heads (1 - 2^-28 is 1 in float32) are kept too.
    np.testing.assert_allclose(f64(retnet.log_gammas(24)), np.log(1 - 2.0 ** (-5 - np.arange(24))), rtol=1e-6)


def rope(x, offset=0):
    """RoPE as complex rotations of the pairs (i, i + d/2) by (offset + t) * 10000^(-2i/d), float64."""
    half = x.shape[-1] // 2
    pairs = f64(x[..., :half]) + 1j * f64(x[..., half:])
    angles = (offset + np.arange(x.shape[1]))[:, None, None] * 10000.0 ** (-2 * np.arange(half) / x.shape[-1])
    turned = pairs * np.exp(1j * angles)
    return np.concatenate([turned.real, turned.imag], axis=-1)


def retention(q, k, v, segments, mask, symmetric=False, row_normalised=False):
    """Retention ``(Q K^T o D) V`` materialised in float64, ``D_ij = gamma_h^(i-j)`` on i >= j (``gamma^|i-j|``
    when symmetric) within a run of real tokens; torchscale's row normalisations optionally."""
    gamma = 1 - 2.0 ** (-5 - np.arange(H))
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    decay = gamma[:, None, None] ** np.abs(i - j)[None]  # [h, L, L]
    if not symmetric:
        decay = np.where(i >= j, decay, 0.0)
    runs, real = runs_of(segments), np.ones((B, L), bool) if mask is None else mask
    visible = (runs[:, :, None] == runs[:, None, :]) & real[:, :, None] & real[:, None, :]
    decay = decay[None] * visible[:, None]  # [b, h, L, L]
    if row_normalised:  # torchscale: D / sqrt(row sum), then scores / clamp(|row sum|, 1, 5e4)
        decay = decay / np.sqrt(np.maximum(decay.sum(-1, keepdims=True), 1e-30))
    scores = np.einsum("bihd,bjhd->bhij", rope(q) / np.sqrt(D), rope(k)) * decay
    if row_normalised:
        scores = scores / np.clip(np.abs(scores.sum(-1, keepdims=True)), 1, 5e4)
    return np.einsum("bhij,bjhd->bihd", scores, f64(v))


def retnet_output(o, v, params, mask):
    gate = (f64(v).reshape(B, L, H * D) @ f64(params["gate"])).reshape(B, L, H, D)
    return masked_rows(rms_norm(o, f64(params["norm"])) * silu(gate), mask)


def random_params(params, seed):
    """The init's params with every leaf redrawn around its init (so norm weights and gates are not trivial)."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [(x + 0.3 * rng.normal(size=x.shape)).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("causal, form", [(True, "chunked"), (True, "parallel"), (False, "chunked"),
                                          (False, "recurrent")])
def test_retnet_equals_the_materialised_float64_retention(causal, form):
    q, k, v = qkv(0)
    params = random_params(init("retnet", q, k, v), 1)
    out = attend_fn(retnet, causal=causal, form=form, chunk_size=16)(q, k, v, params, MASK, SEGMENTS)
    expected = retnet_output(retention(q, k, v, SEGMENTS, MASK, symmetric=not causal), v, params, MASK)
    close(out, expected)


def test_retnet_torchscale_row_normalisation_changes_nothing_after_the_norm():
    q, k, v = qkv(2, scale=2.0)
    params = init("retnet", q, k, v)
    out = attend_fn(retnet, causal=True, form="chunked", chunk_size=16)(q, k, v, params)
    normalised = retnet_output(retention(q, k, v, None, None, row_normalised=True), v, params, None)
    close(out, normalised, 2e-3)  # equal up to the norm's eps (1e-5 against rows of mean square ~1e-2)


def test_retnet_continues_from_the_returned_state_and_position_offset():
    q, k, v = qkv(3)
    params = random_params(init("retnet", q, k, v), 4)
    call = attend_fn(retnet, causal=True, form="chunked", chunk_size=16, return_state=True)
    whole, whole_state = call(q, k, v, params)
    first, state = call(q[:, :23], k[:, :23], v[:, :23], params)
    second, final = call(q[:, 23:], k[:, 23:], v[:, 23:], params, initial_state=state, position_offset=23)
    close(np.concatenate([first, second], axis=1), f64(whole))
    close(final, f64(whole_state))


# --- gla ---------------------------------------------------------------------------------------------------

def test_gla_forget_gate_is_logsigmoid_over_16_clamped_and_starts_near_one():
    q, k, v = qkv(5)
    params = init("gla", q, k, v)
    assert params["gate_down"].shape == (3 * H * D, 16) and params["gate_up"].shape == (16, H * D)
    assert np.all(params["gate_bias"] == 0) and np.all(params["norm"] == 1)
    params = random_params(params, 6)
    u = np.concatenate([f64(x).reshape(B, L, H * D) for x in (q, k, v)], axis=-1)
    logits = u @ f64(params["gate_down"]) @ f64(params["gate_up"]) + f64(params["gate_bias"])
    log_alpha = gla.log_forget(q, k, v, params)
    close(log_alpha, (log_sigmoid(logits) / 16).reshape(B, L, H, D))
    assert np.all(np.asarray(log_alpha) <= 0)
    assert float(jnp.min(gla.log_forget(q, k, v, params, clamp_min=-0.05))) >= np.float32(-0.05)
    alpha = np.exp(f64(gla.log_forget(q, k, v, init("gla", q, k, v))))
    assert 0.95 < alpha.min() and alpha.max() < 0.97  # sigmoid(~0)^(1/16) = 0.958


def gla_reference(q, k, v, params, segments, mask, state=None):
    u = np.concatenate([f64(x).reshape(B, L, H * D) for x in (q, k, v)], axis=-1)
    logits = u @ f64(params["gate_down"]) @ f64(params["gate_up"]) + f64(params["gate_bias"])
    log_alpha = (log_sigmoid(logits) / 16).reshape(B, L, H, D)
    o, final = recurrence(f64(q) / np.sqrt(D), k, v, log_alpha, state, segments, mask)
    gate = (f64(v).reshape(B, L, H * D) @ f64(params["output_gate"])).reshape(B, L, H, D)
    return masked_rows(rms_norm(o, f64(params["norm"])) * silu(gate), mask), final


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_gla_equals_the_float64_recurrence_with_its_gates(form):
    q, k, v = qkv(7)
    params = random_params(init("gla", q, k, v), 8)
    state = np.random.default_rng(9).normal(size=(B, H, D, D)).astype(np.float32)
    out, final = attend_fn(gla, causal=True, form=form, chunk_size=16, return_state=True)(
        q, k, v, params, MASK, SEGMENTS, initial_state=state)
    expected, expected_final = gla_reference(q, k, v, params, SEGMENTS, MASK, state)
    close(out, expected)
    close(final, expected_final)


def test_gla_with_a_decay_constant_over_channels_equals_retnet_without_rotary():
    q, k, v = qkv(10)
    params = random_params(init("gla", q, k, v), 11)
    gamma16 = (1 - 2.0 ** (-5 - np.arange(H))) ** 16
    params["gate_down"] = np.zeros_like(params["gate_down"])
    params["gate_bias"] = np.repeat(np.log(gamma16 / (1 - gamma16)), D).astype(np.float32)  # logsigmoid / 16 = log g
    as_retnet = {"gate": params["output_gate"], "norm": params["norm"]}
    out = attend_fn(gla, causal=True, form="chunked", chunk_size=16)(q, k, v, params, MASK, SEGMENTS)
    expected = attend_fn(retnet, causal=True, form="chunked", chunk_size=16, rotary=False)(
        q, k, v, as_retnet, MASK, SEGMENTS)
    close(out, f64(expected), 1e-4)


def test_gla_bidirectional_sum_is_the_forward_plus_the_reversed_scan():
    q, k, v = qkv(12)
    params = random_params(init("gla", q, k, v), 13)

    def pre_norm(q, k, v, segments, mask):
        g = f64(gla.log_forget(q, k, v, params))
        return recurrence(f64(q) / np.sqrt(D), k, v, g, None, segments, mask)[0]

    o = bidirectional(pre_norm, q, k, v, SEGMENTS, MASK)
    gate = (f64(v).reshape(B, L, H * D) @ f64(params["output_gate"])).reshape(B, L, H, D)
    expected = masked_rows(rms_norm(o, f64(params["norm"])) * silu(gate), MASK)
    out = attend_fn(gla, causal=False, bidirectional="sum", form="chunked", chunk_size=16)(
        q, k, v, params, MASK, SEGMENTS)
    close(out, expected)


# --- hgrn2 -------------------------------------------------------------------------------------------------

def test_hgrn2_forget_gate_stays_above_its_lower_bound_and_its_key_is_one_minus_lambda():
    f = np.linspace(-30, 30, 121, dtype=np.float32)
    for theta in (-4.6, 0.0, 3.0):
        gamma = 1 / (1 + np.exp(-theta))
        log_lambda, key = hgrn2.forget_gate(f, np.float32(theta))
        lam = np.exp(f64(log_lambda))
        assert np.all(lam >= gamma * (1 - 1e-6)) and np.all(f64(log_lambda) <= 0)
        close(lam, gamma + (1 - gamma) / (1 + np.exp(-f64(f))), 1e-6)
        close(key, (1 - gamma) / (1 + np.exp(f64(f))), 1e-6)  # 1 - lambda, without cancellation
    q, k, v = qkv(14)
    params = init("hgrn2", q, k, v)
    np.testing.assert_allclose(1 / (1 + np.exp(-f64(params["lower_bound"]))), 0.01, rtol=1e-6)
    assert "lower_bound" not in init("hgrn2", q, k, v, lower_bound_init=None)


def hgrn2_pre_norm(params):
    theta = f64(params["lower_bound"])
    gamma = 1 / (1 + np.exp(-theta))

    def one_direction(q, k, v, segments, mask, state=None):
        lam = gamma + (1 - gamma) / (1 + np.exp(-f64(k)))
        return recurrence(silu(f64(q)) / np.sqrt(D), 1 - lam, v, np.log(lam), state, segments, mask)
    return one_direction


def hgrn2_output(o, params, mask):
    return masked_rows(rms_norm(o.reshape(B, L, H * D), f64(params["norm"])).reshape(B, L, H, D), mask)


@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_hgrn2_equals_gla_with_key_one_minus_lambda_and_log_decay_log_lambda(form):
    q, k, v = qkv(15)
    params = random_params(init("hgrn2", q, k, v), 16)
    state = np.random.default_rng(17).normal(size=(B, H, D, D)).astype(np.float32)
    out, final = attend_fn(hgrn2, causal=True, form=form, chunk_size=16, return_state=True)(
        q, k, v, params, MASK, SEGMENTS, initial_state=state)
    o, expected_final = hgrn2_pre_norm(params)(q, k, v, SEGMENTS, MASK, state)
    close(out, hgrn2_output(o, params, MASK))
    close(final, expected_final)


def test_hgrn2_default_bidirectional_is_the_official_forward_plus_reversed_scan():
    q, k, v = qkv(18)
    params = random_params(init("hgrn2", q, k, v), 19)
    one_direction = hgrn2_pre_norm(params)
    o = bidirectional(lambda *a: one_direction(*a)[0], q, k, v, SEGMENTS, MASK)
    out = attend_fn(hgrn2, causal=False, form="chunked", chunk_size=16)(q, k, v, params, MASK, SEGMENTS)
    close(out, hgrn2_output(o, params, MASK))


def test_hgrn2_lambda_near_one_freezes_the_state():
    q, k, v = qkv(20)
    params = init("hgrn2", q, k, v)
    params["lower_bound"] = np.full_like(params["lower_bound"], 30.0)  # gamma = 1 - 1e-13: lambda = 1, key = 0
    state = np.random.default_rng(21).normal(size=(B, H, D, D)).astype(np.float32)
    out, final = attend_fn(hgrn2, causal=True, form="chunked", chunk_size=16, return_state=True)(
        q, k, v, params, initial_state=state)
    close(final, f64(state), 1e-6)
    read = np.einsum("blhd,bhde->blhe", silu(f64(q)) / np.sqrt(D), f64(state))
    close(out, hgrn2_output(read, params, None), 1e-5)


# --- mamba2 ------------------------------------------------------------------------------------------------

def mamba2_parts(q, k, v, params, segments, mask):
    """Per direction: the conv (4 taps over each run's real inputs, zeros at pads), SiLU, dt, the log-decay."""
    runs = runs_of(segments, q.shape[0], q.shape[1])
    raw = [masked_rows(f64(x), mask) for x in (v, k, q)]
    taps, bias = f64(params["conv_taps"]), f64(params["conv_bias"])
    conv = []
    for c, x in enumerate(raw):
        y = np.zeros_like(x) + bias[c]
        for s in range(taps.shape[0]):
            for t in range(s, x.shape[1]):
                same = runs[:, t] == runs[:, t - s]
                y[:, t] += np.where(same[:, None, None], taps[s, c] * x[:, t - s], 0.0)
        conv.append(silu(y))
    u = np.concatenate([x.reshape(*x.shape[:2], -1) for x in (raw[2], raw[1], raw[0])], axis=-1)
    dt = np.logaddexp(0.0, u @ f64(params["dt_proj"]) + f64(params["dt_bias"]))  # softplus
    return conv, dt, dt * -np.exp(f64(params["a_log"]))


def mamba2_scan(q, k, v, params, segments, mask, state=None, no_decay=False):
    (x, b, c), dt, log_decay = mamba2_parts(q, k, v, params, segments, mask)
    y, final = recurrence(c, b, x * dt[..., None], 0 * log_decay if no_decay else log_decay, state, segments, mask)
    return y + f64(params["d_skip"])[:, None] * x, final


def mamba2_output(y, v, params, mask, ngroups=1):
    z = f64(v).reshape(B, L, H * D) @ f64(params["gate"])
    gated = (y.reshape(B, L, H * D) * silu(z)).reshape(B, L, ngroups, -1)
    out = rms_norm(gated, 1.0).reshape(B, L, H * D) * f64(params["norm"])
    return masked_rows(out.reshape(B, L, H, D), mask)


def test_mamba2_init_follows_mamba_ssm():
    q, k, v = qkv(22, b=1)
    params = init("mamba2", q, k, v)
    a = -np.exp(f64(params["a_log"]))
    dt = np.logaddexp(0.0, f64(params["dt_bias"]))
    assert np.all((-16 <= a) & (a <= -1)) and np.all((1e-3 <= dt * (1 + 1e-6)) & (dt <= 0.1 * (1 + 1e-6)))
    assert np.all(params["d_skip"] == 1) and np.all(params["norm"] == 1)
    assert params["conv_taps"].shape == (4, 3, H, D) and np.abs(params["conv_taps"]).max() <= 0.5
    assert params["dt_proj"].shape == (3 * H * D, H)


@pytest.mark.parametrize("form, ngroups", [("chunked", 1), ("recurrent", 1), ("parallel", H)])
def test_mamba2_equals_the_float64_ssd_recurrence_with_conv_d_skip_and_gated_norm(form, ngroups):
    q, k, v = qkv(23)
    params = random_params(init("mamba2", q, k, v), 24)
    out = attend_fn(mamba2, causal=True, form=form, chunk_size=16, ngroups=ngroups)(q, k, v, params, MASK, SEGMENTS)
    y, _ = mamba2_scan(q, k, v, params, SEGMENTS, MASK)
    close(out, mamba2_output(y, v, params, MASK, ngroups))


def test_mamba2_without_dt_is_the_d_skip_and_without_a_is_linear_attention():
    q, k, v = qkv(25)
    params = random_params(init("mamba2", q, k, v), 26)
    call = attend_fn(mamba2, causal=True, form="chunked", chunk_size=16)
    no_dt = dict(params, dt_proj=0 * params["dt_proj"], dt_bias=np.full_like(params["dt_bias"], -60.0))
    (x, _, _), _, _ = mamba2_parts(q, k, v, no_dt, SEGMENTS, MASK)
    close(call(q, k, v, no_dt, MASK, SEGMENTS), mamba2_output(f64(params["d_skip"])[:, None] * x, v, params, MASK))
    no_a = dict(params, a_log=np.full_like(params["a_log"], -60.0))
    y, _ = mamba2_scan(q, k, v, no_a, SEGMENTS, MASK, no_decay=True)
    close(call(q, k, v, no_a, MASK, SEGMENTS), mamba2_output(y, v, params, MASK))


def test_mamba2_continues_from_the_returned_ssm_state_and_conv_inputs():
    q, k, v = qkv(27)
    params = random_params(init("mamba2", q, k, v), 28)
    call = attend_fn(mamba2, causal=True, form="chunked", chunk_size=16, return_state=True)
    segments = np.repeat(np.array([[1, 2, 3, 3], [1, 1, 1, 2]]), 10, axis=1)  # the cut at 22 inside a run
    whole, whole_state = call(q, k, v, params, segment_ids=segments)
    first, state = call(q[:, :22], k[:, :22], v[:, :22], params, segment_ids=segments[:, :22])
    second, final = call(q[:, 22:], k[:, 22:], v[:, 22:], params, segment_ids=segments[:, 22:], initial_state=state)
    close(np.concatenate([first, second], axis=1), f64(whole))
    close(final.ssm, f64(whole_state.ssm))
    close(final.conv, f64(whole_state.conv))


def test_mamba2_bidirectional_sum_is_the_forward_plus_the_reversed_scan():
    q, k, v = qkv(29)
    params = random_params(init("mamba2", q, k, v), 30)
    y = bidirectional(lambda q, k, v, s, m: mamba2_scan(q, k, v, params, s, m)[0], q, k, v, SEGMENTS, MASK)
    out = attend_fn(mamba2, causal=False, bidirectional="sum", form="chunked", chunk_size=16)(
        q, k, v, params, MASK, SEGMENTS)
    close(out, mamba2_output(y, v, params, MASK))


# --- refusals ----------------------------------------------------------------------------------------------

def test_methods_refuse_undefined_directions_cross_attention_and_bad_options_in_one_line():
    q, k, v = qkv(31, length=8)
    variables = {name: init(name, q, k, v) for name in ("retnet", "gla", "hgrn2", "mamba2")}
    cases = [
        (NotImplementedError, "gla", lambda: gla.attend(q, k, v, variables["gla"])),
        (NotImplementedError, "mamba2", lambda: mamba2.attend(q, k, v, variables["mamba2"])),
        (NotImplementedError, "retnet", lambda: retnet.attend(q[:, :4], k, v, variables["retnet"])),
        (ValueError, "gla", lambda: gla.attend(q, k, v, variables["gla"], causal=False, bidirectional="max")),
        (ValueError, "gla", lambda: gla.attend(q, k, v, variables["gla"], causal=True, clamp_min=0.5)),
        (ValueError, "mamba2", lambda: mamba2.attend(q, k, v, variables["mamba2"], causal=True, ngroups=3)),
        (ValueError, "mamba2", lambda: mamba2.attend(q, k, v, variables["mamba2"], causal=True,
                                                     initial_state=np.zeros((B, H, D, D), np.float32))),
        (ValueError, "hgrn2", lambda: hgrn2.attend(q, k, v, variables["hgrn2"], return_state=True)),
        (ValueError, "retnet", lambda: retnet.attend(q, k, v, variables["retnet"], causal=True, form="scan")),
        (ValueError, "retnet", lambda: retnet.attend(q, k, v, variables["retnet"], causal=True, chunk_size=12)),
        (ValueError, "retnet", lambda: retnet.attend(q[..., :3], k[..., :3], v[..., :3], variables["retnet"])),
    ]
    for error, name, fn in cases:
        with pytest.raises(error) as err:
            fn()
        assert str(err.value).startswith(f"{name}: ") and "\n" not in str(err.value), str(err.value)

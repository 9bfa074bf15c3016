"""RWKV-7 (``effjax.attention.rwkv7``) against a float64 numpy transcription of the official time mixing
(``rwkv_v7_numpy.py``'s ``time_mixing``, one token at a time, with the method's documented token shift on q, k, v
and no value residual), its official init, the DeltaNet identity, padding, packing, the bidirectional sum and
the refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import rwkv7

B, L, H, D = 2, 24, 2, 8
FAST = {"xla_backend_optimization_level": 0}
time_mixing = jax.jit(rwkv7.time_mixing, compiler_options=FAST)
SEGMENTS = np.array([[4] * 7 + [9] * 10 + [4] * 7,  # A-B-A: three runs
                     [0] * 16 + [1] * 8])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def qkv(seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (B, L, H, D), dtype) for key in keys]


def random_params(seed, layer_idx=1, num_layers=4):
    """The official init for layer 1 of 4, every leaf moved by noise so that no zero init hides a term."""
    params = rwkv7.init_params(jax.random.key(0), H, D, layer_idx=layer_idx, num_layers=num_layers)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@functools.cache
def compiled_attend(form="chunked", bidirectional=None):
    """The jitted method, causal with its state returned (or the bidirectional sum); always called with a mask and
    segment ids, so that each form compiles once."""
    causal = bidirectional is None
    fn = functools.partial(rwkv7.attend, causal=causal, form=form, chunk_size=16, bidirectional=bidirectional,
                           return_state=causal)
    return jax.jit(fn, compiler_options=FAST)


def run(q, k, v, params, form="chunked", *, mask=None, segments=None, initial_state=None, bidirectional=None):
    mask = np.ones((B, L), bool) if mask is None else mask
    segments = np.zeros((B, L), int) if segments is None else segments
    call = dict(mask=jnp.asarray(mask), segment_ids=jnp.asarray(segments))
    if bidirectional is None:
        call["initial_state"] = jnp.zeros((B, H, D, D)) if initial_state is None else initial_state
    return compiled_attend(form, bidirectional)(q, k, v, params, **call)


def official_time_mixing(q, k, v, params, segments=None):
    """float64, per token as ``rwkv_v7_numpy.time_mixing`` (state ``S [heads, d_v, d_k]``), the inputs being the
    projected q (receptance), k, v shifted per channel (the method's departure 1), the LoRAs reading the shifted
    concat(q, k, v), no v_first residual. Returns the output and the per-token quantities."""
    p = {name: np.asarray(x, np.float64) for name, x in params.items()}
    q, k, v = (np.asarray(x, np.float64).reshape(B, L, H * D) for x in (q, k, v))
    out = np.zeros((B, L, H * D))
    seen = {name: np.zeros((B, L, H * D)) for name in ("w", "a", "kk", "k", "g")}
    for row in range(B):
        last_x = np.zeros(3 * H * D)
        state = np.zeros((H, D, D))
        for t in range(L):
            if segments is not None and t > 0 and segments[row, t] != segments[row, t - 1]:
                last_x, state = np.zeros_like(last_x), np.zeros_like(state)
            x = np.concatenate([q[row, t], k[row, t], v[row, t]])
            xr, xk, xv = (part + mix.reshape(-1) * (last - part)
                          for part, last, mix in zip(np.split(x, 3), np.split(last_x, 3),
                                                     (p["mix_r"], p["mix_k"], p["mix_v"]), strict=True))
            xw, xa, xg = (x + p[f"mix_{n}"] * (last_x - x) for n in "wag")
            r, key, value = xr, xk, xv
            w = np.exp(-sigmoid(np.tanh(xw @ p["w1"]) @ p["w2"] + p["w0"]) / np.e ** 0.5)
            a = sigmoid(xa @ p["a1"] @ p["a2"] + p["a0"])
            g = sigmoid(xg @ p["g1"]) @ p["g2"]
            kk = key * p["k_k"].reshape(-1)
            key = key + key * (a - 1) * p["k_a"].reshape(-1)
            r, w, key, value, kk, a, r_k = (x_.reshape(H, D, 1) for x_ in (r, w, key, value, kk, a, p["r_k"]))
            kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)
            state = (state * w.transpose(0, 2, 1) - state @ kk * (kk * a).transpose(0, 2, 1)
                     + value * key.transpose(0, 2, 1))
            y = (state @ r)[..., 0]
            y = (y - y.mean(axis=1, keepdims=True)) / np.sqrt(y.var(axis=1, keepdims=True) + D * 1e-5)
            y = y.reshape(-1) * p["norm_scale"].reshape(-1) + p["norm_bias"].reshape(-1)
            y = y + ((r * key * r_k).sum(axis=1, keepdims=True) * value).reshape(-1)
            out[row, t] = y * g
            for name, val in (("w", w), ("a", a), ("kk", kk), ("k", key), ("g", g)):
                seen[name][row, t] = val.reshape(-1)
            last_x = x
    return out.reshape(B, L, H, D), {name: x.reshape(B, L, H, D) for name, x in seen.items()}


def close(actual, expected, tol=1e-4):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("form", ["chunked", "parallel", "recurrent"])
def test_matches_the_official_time_mixing_in_float64(form):
    params = random_params(1)
    q, k, v = qkv(2)
    out, _ = run(q, k, v, params, form, segments=SEGMENTS)
    expected, _ = official_time_mixing(q, k, v, params, SEGMENTS)
    close(out, expected)


def test_per_token_quantities_match_the_official_formulas():
    params = random_params(3)
    q, k, v = qkv(4)
    got = time_mixing(q, k, v, params)
    _, expected = official_time_mixing(q, k, v, params)
    for name, mine in (("w", jnp.exp(got["log_w"])), ("a", got["alpha"]), ("kk", got["kappa"]), ("k", got["k"]),
                       ("g", got["g"])):
        close(mine, expected[name], 1e-5)


def test_init_follows_the_official_formulas():
    layer, layers, width = 2, 5, H * D
    params = rwkv7.init_params(jax.random.key(0), H, D, layer_idx=layer, num_layers=layers)
    n = np.arange(width)
    fraction, linear = n / width, n / (width - 1) - 0.5
    zigzag = ((n % D) - (D - 1) / 2) / ((D - 1) / 2)
    zigzag = zigzag * np.abs(zigzag)
    remaining = 1 - layer / layers
    for name, power in (("r", 0.2), ("k", 0.7), ("v", 0.7)):
        close(params[f"mix_{name}"].reshape(-1), 1 - fraction ** (power * remaining), 1e-6)
    for name, power in (("w", 0.9), ("a", 0.9), ("g", 0.2)):
        close(params[f"mix_{name}"], np.tile(1 - fraction ** (power * remaining), 3), 1e-6)
    decay = -6 + 6 * (n / (width - 1)) ** (1 + (layer / (layers - 1)) ** 0.3)
    close(params["w0"], decay + 0.5 + 2.5 * zigzag, 1e-6)
    close(params["a0"], -0.19 + 0.3 * zigzag + 0.4 * linear, 1e-6)
    close(params["k_k"].reshape(-1), 0.71 - 0.1 * linear, 1e-6)
    close(params["k_a"], np.full((H, D), 1.02), 1e-6)
    close(params["r_k"], np.full((H, D), -0.04), 1e-6)
    close(params["norm_scale"], np.full((H, D), ((layer + 1) / layers) ** 0.7), 1e-6)
    assert not np.any(params["norm_bias"])
    for name in "wag":
        first, second = params[f"{name}1"], params[f"{name}2"]
        assert first.shape == (3 * width, 32) and not np.any(first)
        rank = second.shape[0]
        gain = 0.1 * np.sqrt(rank / width) if rank > width else 0.1
        gram = second @ second.T if rank <= width else second.T @ second
        close(gram, gain ** 2 * np.eye(min(rank, width)), 1e-5)
    # At init (w1 = 0) the decay is exp(-e^-0.5 sigmoid(w0)), inside the official range [exp(-0.6065), 1).
    w = np.exp(-np.exp(-0.5) * sigmoid(np.asarray(params["w0"], np.float64)))
    assert w.min() > np.exp(-0.6066) and w.max() < 1.0


def test_lora_ranks_follow_the_official_suggestion():
    assert rwkv7.lora_rank(768, 2.5) == 64 and rwkv7.lora_rank(768, 5.0) == 128  # the 0.1B model's 64 and 128
    assert rwkv7.lora_rank(4096, 2.5) == 160 and rwkv7.lora_rank(4096, 2.5, 128 / 64) == 320
    assert rwkv7.lora_rank(64, 2.5) == 32
    params = jax.eval_shape(lambda: rwkv7.init_params(jax.random.key(0), H, D, decay_rank=8, a_rank=4, gate_rank=16))
    assert params["w2"].shape == (8, H * D) and params["a2"].shape == (4, H * D) and params["g2"].shape == (16, H * D)


def test_no_decay_full_rate_and_unit_keys_give_deltanet():
    # w = 1 (w0 -> -inf), alpha = 1 (a0 -> +inf), k_k = 1 and unit keys without shift: kappa = k~ = k, so the state
    # follows DeltaNet with beta = 1; with g = 1 and no bonus term the output is GroupNorm(S_t^T r_t).
    params = dict(random_params(5))
    width = H * D
    params.update(w0=jnp.full((width,), -1e4), a0=jnp.full((width,), 1e4), k_k=jnp.ones((H, D)),
                  mix_k=jnp.zeros((H, D)), r_k=jnp.zeros((H, D)), norm_scale=jnp.ones((H, D)),
                  norm_bias=jnp.zeros((H, D)), g1=jnp.zeros_like(params["g1"]),
                  g2=jnp.full(params["g2"].shape, 2.0 / params["g2"].shape[0]))
    q, k, v = qkv(6)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    mixed = time_mixing(q, k, v, params)
    r, value = (np.asarray(mixed[name], np.float64) for name in ("r", "v"))
    unit = np.asarray(k, np.float64)
    expected = np.zeros((B, L, H, D))
    for row in range(B):
        for h in range(H):
            s = np.zeros((D, D))
            for t in range(L):
                s = s + np.outer(unit[row, t, h], value[row, t, h] - s.T @ unit[row, t, h])
                y = s.T @ r[row, t, h]
                expected[row, t, h] = (y - y.mean()) / np.sqrt(y.var() + D * 1e-5)
    for form in ("chunked", "recurrent"):
        close(run(q, k, v, params, form)[0], expected)


def test_padded_tokens_change_nothing_and_output_zero():
    params = random_params(7)
    q, k, v = qkv(8)
    mask = np.arange(L)[None, :] < np.array([[17], [L]])
    pad = jnp.asarray(~mask)[:, :, None, None]
    out, _ = run(q + 5.0 * pad, k - 3.0 * pad, v + 2.0 * pad, params, mask=mask)
    expected, _ = official_time_mixing(*(jnp.where(pad, 0.0, x) for x in (q, k, v)), params)
    close(out[1], expected[1])
    close(out[0, :17], expected[0, :17])  # the real tokens before the pads see nothing of them
    assert not np.any(np.asarray(out)[~mask])


def test_the_state_is_returned_and_read_back():
    # Without the shift (mixes 0) the returned state continues the sequence exactly; the shift cache is not
    # carried (departure 5), so with it the token after a cut would read a zero previous token.
    params = dict(random_params(9))
    params.update({f"mix_{n}": jnp.zeros_like(params[f"mix_{n}"]) for n in "rkvwag"})
    q, k, v = qkv(10)
    out, state = run(q, k, v, params)
    assert state.shape == (B, H, D, D) and state.dtype == jnp.float32
    first = np.arange(L)[None, :].repeat(B, 0) < 13
    _, middle = run(q, k, v, params, mask=first)
    again, final = run(q, k, v, params, mask=~first, initial_state=middle)
    close(final, np.asarray(state, np.float64), 1e-5)
    close(again[:, 13:], np.asarray(out[:, 13:], np.float64), 1e-5)


def test_bidirectional_sum_is_forward_plus_reversed_scan_and_refused_by_default():
    params = random_params(11)
    q, k, v = qkv(12)
    both = run(q, k, v, params, segments=SEGMENTS, bidirectional="sum")
    forward, _ = run(q, k, v, params, segments=SEGMENTS)
    flip = functools.partial(jnp.flip, axis=1)
    reverse, _ = run(flip(q), flip(k), flip(v), params, segments=SEGMENTS[:, ::-1])
    close(both, np.asarray(forward + flip(reverse), np.float64), 1e-5)
    with pytest.raises(NotImplementedError, match="rwkv7: causal=False"):
        rwkv7.attend(q, k, v, params)
    with pytest.raises(ValueError, match="rwkv7: initial_state and return_state"):
        rwkv7.attend(q, k, v, params, bidirectional="sum", return_state=True)


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    module = attention.make("rwkv7")
    q, k, v = qkv(13)
    params = rwkv7.init_params(jax.random.key(0), H, D)
    apply = jax.jit(lambda q, k, v: module.apply({"params": params}, q, k, v, causal=True), compiler_options=FAST)
    low = apply(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert low.dtype == jnp.bfloat16
    reference = apply(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(low, np.float32), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fields,call,error,what", [
    ({}, dict(k_len=L - 1), NotImplementedError, "cross attention"),
    ({"bidirectional": "max"}, {}, ValueError, "bidirectional must be"),
    ({"layer_idx": 3, "num_layers": 3}, {}, ValueError, "layer_idx must be"),
    ({"form": "blocked"}, {}, ValueError, "form must be"),
    ({"chunk_size": 24}, {}, ValueError, "chunk_size must be"),
    ({}, dict(mask=np.ones((B, L + 1), bool)), ValueError, "mask must have"),
])
def test_bad_inputs_are_refused_naming_the_method(fields, call, error, what):
    q, k, v = qkv(14)
    call = dict(call)
    kv_len = call.pop("k_len", L)
    k, v = k[:, :kv_len], v[:, :kv_len]
    module = attention.make("rwkv7", **fields)
    with pytest.raises(error) as raised:
        module.init(jax.random.key(0), q, k, v, causal=True, **call)
    assert str(raised.value).startswith("rwkv7: ") and what in str(raised.value)

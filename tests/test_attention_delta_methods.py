"""The delta-rule methods ``deltanet`` and ``gated_deltanet`` against a float64 numpy layer written from the papers
(and fla's layers): short causal conv + SiLU, L2-normalised q and k, beta and the decay from the raw q/k/v features,
the token recurrence, the per-head RMSNorm and the output gate; in every form, with padding and packing. Also: the
state in and out, the bidirectional sum, g = 0 giving DeltaNet, the initialisations, and the refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import deltanet, gated_deltanet

B, L, H, D = 2, 40, 2, 8
CHUNK = 16  # does not divide L
METHODS = {"deltanet": deltanet, "gated_deltanet": gated_deltanet}
FORMS = ("chunked", "parallel", "recurrent")
TOL = dict(rtol=1e-4, atol=3e-5)
SEGMENTS = np.repeat(np.array([[4, 9, 4], [1, 1, 2]]), [14, 11, 15], axis=1)  # A-B-A in row 0, cuts inside chunks
MASK = np.ones((B, L), bool)
MASK[0, 35:] = False
MASK[1, [2, 20]] = False


def fast(fn):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def qkv(seed, length=L):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [np.asarray(jax.random.normal(kk, (B, length, H, D))) for kk in keys]


@functools.cache
def variables(name, **fields):
    """The module's parameters (its own initialisation) for q, k, v of [B, L, H, D]."""
    module = attention.make(name, **fields)
    q, k, v = qkv(0)
    init = fast(lambda key, q, k, v: module.init(key, q, k, v, causal=True)["params"])
    return jax.tree.map(np.asarray, init(jax.random.key(1), q, k, v))


@functools.cache
def method(name, form, **options):
    def run(q, k, v, params, mask, segment_ids, initial_state):
        return METHODS[name].attend(q, k, v, params, mask=mask, segment_ids=segment_ids, form=form,
                                    chunk_size=CHUNK, initial_state=initial_state, **options)
    return fast(run)


def call(name, form, q, k, v, params, *, mask=None, segment_ids=None, initial_state=None, **options):
    mask = np.ones(q.shape[:2], bool) if mask is None else mask
    segment_ids = np.zeros(q.shape[:2], int) if segment_ids is None else segment_ids
    return method(name, form, **options)(q, k, v, params, mask, segment_ids, initial_state)


def silu(x):
    return x / (1 + np.exp(-x))


def layer_reference(q, k, v, p, *, mask, segments, allow_neg_eigval=False, initial_state=None):
    """The layer in float64, from the equations: one row, head and token at a time for the conv and recurrence."""
    keep = mask[..., None, None]
    q, k, v = (np.where(keep, np.asarray(x, np.float64), 0.0) for x in (q, k, v))
    p = {key: np.asarray(val, np.float64) for key, val in p.items()}
    batch, length, heads, dim = q.shape
    u = np.concatenate([x.reshape(batch, length, -1) for x in (q, k, v)], axis=-1)
    beta = (2.0 if allow_neg_eigval else 1.0) / (1 + np.exp(-(u @ p["beta"])))
    g = np.zeros(beta.shape)
    if "a_log" in p:
        g = -np.exp(p["a_log"]) * np.log1p(np.exp(u @ p["decay"] + p["dt_bias"]))

    def conv(x, taps):
        if taps is None:
            return silu(x)
        y = np.zeros_like(x)
        for row in range(batch):
            for t in range(length):
                for s in range(min(len(taps), t + 1)):
                    if segments[row, t - s] == segments[row, t]:
                        y[row, t] += taps[s] * x[row, t - s]
        return silu(y)

    def l2(x):
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)

    qc, kc, vc = (conv(x, p.get(f"conv_{n}")) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    qc, kc = l2(qc) / np.sqrt(dim), l2(kc)
    out = np.zeros(v.shape)
    states = np.zeros((batch, heads, dim, dim)) if initial_state is None else np.array(initial_state, np.float64)
    for row in range(batch):
        for head in range(heads):
            s = states[row, head]
            for t in range(length):
                if t > 0 and segments[row, t] != segments[row, t - 1]:
                    s = np.zeros_like(s)
                if not mask[row, t]:
                    continue
                kt, bt = kc[row, t, head], beta[row, t, head]
                s = np.exp(g[row, t, head]) * (s - bt * np.outer(kt, kt @ s)) + bt * np.outer(kt, vc[row, t, head])
                out[row, t, head] = s.T @ qc[row, t, head]
            states[row, head] = s
    out = out / np.sqrt(np.mean(out * out, axis=-1, keepdims=True) + 1e-5) * p["norm"]
    if "gate" in p:
        out = out * silu((v.reshape(batch, length, -1) @ p["gate"]).reshape(v.shape))
    return out, states


def junk_at_pads(mask, *xs):
    return [np.where(mask[..., None, None], x, 5.0).astype(np.float32) for x in xs]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_equals_the_float64_layer_with_padding_and_packing(name, form):
    params = variables(name)
    q, k, v = junk_at_pads(MASK, *qkv(2))
    out, state = call(name, form, q, k, v, params, mask=MASK, segment_ids=SEGMENTS, causal=True, return_state=True)
    want_out, want_state = layer_reference(q, k, v, params, mask=MASK, segments=SEGMENTS)
    np.testing.assert_allclose(out, want_out, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)
    assert np.all(np.asarray(out)[~MASK] == 0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_options_off_the_defaults_equal_the_float64_layer(name):
    # DeltaNet with its output gate, Gated DeltaNet without it; both without the conv and with beta in (0, 2).
    params = dict(variables(name, use_gate=name == "deltanet", use_short_conv=False))
    assert ("gate" in params) == (name == "deltanet") and "conv_q" not in params
    q, k, v = qkv(3)
    out, _ = call(name, "chunked", q, k, v, params, causal=True, allow_neg_eigval=True, return_state=True)
    want, _ = layer_reference(q, k, v, params, mask=np.ones((B, L), bool), segments=np.zeros((B, L)),
                              allow_neg_eigval=True)
    np.testing.assert_allclose(out, want, **TOL)


def test_the_state_goes_in_and_out():
    # Without the conv (its 3-token cache is not part of the state), a cut anywhere continues exactly.
    name = "gated_deltanet"
    params = dict(variables(name, use_short_conv=False))
    q, k, v = qkv(4)
    s0 = np.asarray(jax.random.normal(jax.random.key(5), (B, H, D, D)))
    whole, whole_state = call(name, "chunked", q, k, v, params, initial_state=s0, causal=True, return_state=True)
    want, want_state = layer_reference(q, k, v, params, mask=np.ones((B, L), bool), segments=np.zeros((B, L)),
                                       initial_state=s0)
    np.testing.assert_allclose(whole, want, **TOL)
    np.testing.assert_allclose(whole_state, want_state, **TOL)
    cut = L // 2
    first, state = call(name, "chunked", *(x[:, :cut] for x in (q, k, v)), params, initial_state=s0, causal=True,
                        return_state=True)
    second, state = call(name, "chunked", *(x[:, cut:] for x in (q, k, v)), params, initial_state=state,
                         causal=True, return_state=True)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, whole_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bidirectional_sum_is_the_layer_plus_the_layer_reversed(name):
    params = variables(name)
    q, k, v = junk_at_pads(MASK, *qkv(6))
    module = attention.make(name, chunk_size=CHUNK, bidirectional="sum")
    out = fast(lambda q, k, v: module.apply({"params": params}, q, k, v, mask=MASK, segment_ids=SEGMENTS))(q, k, v)
    forward, _ = layer_reference(q, k, v, params, mask=MASK, segments=SEGMENTS)
    flipped = [np.flip(x, axis=1) for x in (q, k, v)]
    backward, _ = layer_reference(*flipped, params, mask=np.flip(MASK, 1), segments=np.flip(SEGMENTS, 1))
    np.testing.assert_allclose(out, forward + np.flip(backward, axis=1), **TOL)


def test_gated_deltanet_with_zero_decay_is_deltanet_exactly():
    params = dict(variables("gated_deltanet"))
    params["a_log"] = np.full((H,), -np.inf, np.float32)  # exp(A_log) = 0: g = 0 at every token
    shared = {key: params[key] for key in ("beta", "norm", "gate", "conv_q", "conv_k", "conv_v")}
    q, k, v = qkv(7)
    options = dict(mask=MASK, segment_ids=SEGMENTS, causal=True, return_state=True)
    gated = call("gated_deltanet", "chunked", q, k, v, params, **options)
    plain = call("deltanet", "chunked", q, k, v, shared, **options)
    for got, want in zip(gated, plain, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_module_applies_attend_in_the_input_dtype(name):
    q, k, v = qkv(8)
    module = attention.make(name, chunk_size=CHUNK)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = fast(lambda *x: module.apply({"params": variables(name)}, *x, mask=MASK, causal=True))(*low)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, L, H, D)
    want, _ = call(name, "chunked", *(np.asarray(x, np.float32) for x in low), variables(name), mask=MASK,
                   causal=True, return_state=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)


def test_the_initialisations_follow_fla():
    delta, gated = variables("deltanet"), variables("gated_deltanet")
    assert set(delta) == {"beta", "norm", "conv_q", "conv_k", "conv_v"}  # no output gate by default
    assert set(gated) == {"beta", "norm", "conv_q", "conv_k", "conv_v", "gate", "decay", "a_log", "dt_bias"}
    assert delta["conv_q"].shape == (4, H, D) and np.abs(delta["conv_q"]).max() <= 0.5  # U(+-1/sqrt(4))
    assert delta["beta"].shape == (3 * H * D, H) and gated["gate"].shape == (H * D, H * D)
    np.testing.assert_array_equal(delta["norm"], np.ones(D))
    a_log, dt_bias = (np.asarray(gated_deltanet.a_log_init(jax.random.key(0), (4096,))),
                      np.asarray(gated_deltanet.dt_bias_init(jax.random.key(1), (4096,))))
    a = np.exp(a_log)
    assert a.min() > 0 and a.max() <= 16 and abs(a.mean() - 8) < 0.5  # A ~ U(0, 16)
    dt = np.log1p(np.exp(dt_bias))  # softplus(dt_bias) = dt, log-uniform in [1e-3, 0.1]
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert abs(np.mean(np.log(dt)) - np.log(1e-3 * 0.1) / 2) < 0.1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_refusals_are_one_line_and_name_the_method(name):
    params = variables(name)
    q, k, v = qkv(9)
    attend = METHODS[name].attend
    cases = [
        (NotImplementedError, "causal=False", lambda: attend(q, k, v, params)),
        (NotImplementedError, "cross attention", lambda: attend(q[:, :8], k, v, params, causal=True)),
        (ValueError, "bidirectional", lambda: attend(q, k, v, params, bidirectional="max")),
        (ValueError, "form", lambda: attend(q, k, v, params, causal=True, form="fused")),
        (ValueError, "chunk_size", lambda: attend(q, k, v, params, causal=True, chunk_size=24)),
        (ValueError, "mask", lambda: attend(q, k, v, params, causal=True, mask=np.ones((B, L - 1), bool))),
        (ValueError, "initial_state", lambda: attend(q, k, v, params, causal=True,
                                                     initial_state=np.zeros((B, H, D, D), np.float16))),
        (ValueError, "need causal=True", lambda: attend(q, k, v, params, bidirectional="sum", return_state=True)),
    ]
    for error, argument, fn in cases:
        with pytest.raises(error) as err:
            fn()
        message = str(err.value)
        assert message.startswith(f"{name}: ") and argument in message and "\n" not in message, message
    module = attention.make(name)
    with pytest.raises(NotImplementedError, match=f"^{name}: causal=False"):
        module.init(jax.random.key(0), q, k, v)

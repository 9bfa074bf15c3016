"""Long-convolution and scan mixers: fftconv and scan helpers, kernelized_rpe, hyena, hyena_nd and mamba against
direct float64 numpy references, plus causality, padding, segments, reductions and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import fftconv, hyena, hyena_nd, kernel_attention, kernelized_rpe, mamba, scan


def fast(fn, **kwargs):
    """jax.jit without XLA's backend optimizations: they cost most of these small tests' CPU time."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def qkv(seed, b=2, lq=9, lk=9, h=2, d=3):
    return normal(seed, (b, lq, h, d)), normal(seed + 1, (b, lk, h, d)), normal(seed + 2, (b, lk, h, d))


def f64(x):
    return np.asarray(x, np.float64)


def np_causal(x, kernel):
    """Direct causal conv along axis 1 of [b, l, c] with kernel [taps, c], via np.convolve per channel."""
    b, n, c = x.shape
    return np.stack([np.stack([np.convolve(x[i, :, j], kernel[:, j])[:n] for j in range(c)], -1)
                     for i in range(b)])


def np_two_sided(x, forward, backward):
    """y_t = sum_{s<=t} forward[t-s] x_s + sum_{s>t} backward[s-t-1] x_s, the anti-causal half on reversed x."""
    shifted = np.concatenate([np.zeros((1, backward.shape[1])), backward], axis=0)
    return np_causal(x, forward) + np_causal(x[:, ::-1], shifted)[:, ::-1]


def np_quadrant(x, kernel):
    """Direct y[i, j] = sum_{a<=i, b<=j} kernel[i-a, j-b] x[a, b] for x [b, h, w, c], kernel [h, w, c]."""
    _, h, w, _ = x.shape
    y = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for a in range(i + 1):
                for bb in range(j + 1):
                    y[:, i, j] += kernel[i - a, j - bb] * x[:, a, bb]
    return y


def np_short(x, taps, bias):
    """Depthwise causal short conv of [b, l, ...] with taps [k, ...]: y_t = bias + sum_s taps[s] x_{t-s}."""
    y = np.broadcast_to(bias, x.shape).copy()
    for s in range(taps.shape[0]):
        y[:, s:] += taps[s] * x[:, :x.shape[1] - s]
    return y


def lengths_mask(lengths, n):
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


# --- fftconv -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("taps", [4, 11, 20])
def test_fft_causal_conv_equals_np_convolve(taps):
    x, kernel = normal(0, (2, 11, 3)), normal(1, (taps, 3))
    np.testing.assert_allclose(fast(fftconv.causal)(x, kernel), np_causal(f64(x), f64(kernel)), atol=1e-5)


@pytest.mark.parametrize("out_len,in_len", [(7, 7), (4, 9), (9, 4)])
def test_fft_toeplitz_equals_the_materialized_toeplitz_matrix(out_len, in_len):
    x, kernel = normal(2, (2, in_len, 3)), normal(3, (out_len + in_len - 1, 3))
    t, s = np.arange(out_len)[:, None], np.arange(in_len)[None, :]
    matrix = f64(kernel)[t - s + in_len - 1]  # [out, in, c]
    ref = np.einsum("tsc,bsc->btc", matrix, f64(x))
    np.testing.assert_allclose(fast(fftconv.toeplitz, static_argnums=2)(x, kernel, out_len), ref, atol=1e-5)


def test_fft_two_sided_equals_direct_sums():
    x, fwd, bwd = normal(4, (2, 10, 3)), normal(5, (10, 3)), normal(6, (9, 3))
    out = fast(fftconv.two_sided)(x, fwd, bwd)
    np.testing.assert_allclose(out, np_two_sided(f64(x), f64(fwd), f64(bwd)), atol=1e-5)


def test_fft_quadrant_conv2d_equals_direct_2d_conv():
    x, kernel = normal(7, (2, 4, 5, 3)), normal(8, (4, 5, 3))
    np.testing.assert_allclose(fast(fftconv.causal2d)(x, kernel), np_quadrant(f64(x), f64(kernel)), atol=1e-5)


def test_short_causal_conv_equals_direct_and_cuts_at_segments():
    x, taps, bias = normal(9, (2, 8, 3)), normal(10, (3, 3)), normal(11, (3,))
    np.testing.assert_allclose(fast(fftconv.short_causal)(x, taps, bias), np_short(f64(x), f64(taps), f64(bias)),
                               atol=1e-6)
    segments = np.repeat([[0, 1], [0, 1]], [5, 3], axis=1)
    cut = fast(fftconv.short_causal)(x, taps, bias, segments)
    ref = np.concatenate([np_short(f64(x[:, :5]), f64(taps), f64(bias)),
                          np_short(f64(x[:, 5:]), f64(taps), f64(bias))], axis=1)
    np.testing.assert_allclose(cut, ref, atol=1e-6)
    aba = np.repeat([[0, 1, 0], [0, 1, 0]], [4, 1, 3], axis=1)  # B shorter than the taps: A's two runs stay apart
    runs = [np_short(f64(x[:, a:b]), f64(taps), f64(bias)) for a, b in ((0, 4), (4, 5), (5, 8))]
    np.testing.assert_allclose(fast(fftconv.short_causal)(x, taps, bias, aba), np.concatenate(runs, axis=1), atol=1e-6)


# --- scan ----------------------------------------------------------------------------------------------------

def np_recurrence(a, b, initial=None):
    h = np.zeros(b.shape[:1] + b.shape[2:]) if initial is None else f64(initial)
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return np.stack(out, axis=1)


def test_associative_scan_equals_a_python_loop():
    a, b, h0 = jax.random.uniform(jax.random.key(12), (2, 13, 3)), normal(13, (2, 13, 3)), normal(14, (2, 3))
    np.testing.assert_allclose(fast(scan.linear_recurrence)(a, b), np_recurrence(f64(a), f64(b)), atol=1e-5)
    from_h0 = fast(lambda a, b, h0: scan.linear_recurrence(a, b, initial=h0))(a, b, h0)
    np.testing.assert_allclose(from_h0, np_recurrence(f64(a), f64(b), h0), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])
def test_chunked_scan_equals_the_loop_whatever_the_chunk(chunk_size):
    a, b, c = jax.random.uniform(jax.random.key(15), (2, 13, 3)), normal(16, (2, 13, 3)), normal(17, (2, 13, 3))
    y = fast(lambda *t: scan.chunked(lambda xs: (xs[0], xs[1]), lambda h, xs: h * xs[2], t, chunk_size=chunk_size))(
        a, b, c)
    np.testing.assert_allclose(y, np_recurrence(f64(a), f64(b)) * f64(c), atol=1e-5)


def test_chunked_scan_rejects_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        scan.chunked(lambda xs: xs, lambda h, xs: h, (jnp.ones((1, 4)), jnp.ones((1, 4))), chunk_size=0)


# --- kernelized_rpe ------------------------------------------------------------------------------------------

def rpe_reference(q, k, v, projection, rpe, mask, causal):
    """Materialized (phi_Q phi_K^T * C) V / (rowsum + eps) in float64 with C_ij = exp(b_{i'-j}), i' end-aligned."""
    phi_q, phi_k = (f64(kernelized_rpe.feature_map(x, projection)) for x in (q, k))
    lq, lk = q.shape[1], k.shape[1]
    offsets = np.arange(lq)[:, None] + (lk - lq) - np.arange(lk)[None, :]
    max_length = (rpe.shape[1] + 1) // 2
    logits = f64(rpe)[:, max_length - 1 + offsets]  # [h, lq, lk]
    allowed = np.broadcast_to(offsets >= 0 if causal else True, offsets.shape)
    used = np.where(allowed, logits, -np.inf).max(axis=(1, 2), keepdims=True)  # the shift the FFT path uses
    c = np.where(allowed, np.exp(logits - used), 0.0)
    w = np.einsum("bqhm,bkhm->bhqk", phi_q, phi_k) * c[None] * mask[:, None, None, :]
    num = np.einsum("bhqk,bkhd->bqhd", w, f64(v))
    return num / (w.sum(-1).transpose(0, 2, 1)[..., None] + kernel_attention.EPS)


@pytest.mark.parametrize("causal,lq,lk", [(False, 9, 9), (True, 9, 9), (False, 5, 9), (True, 5, 9), (True, 9, 5)])
def test_kernelized_rpe_fft_path_equals_materialized(causal, lq, lk):
    q, k, v = qkv(20, lq=lq, lk=lk)
    projection, rpe = normal(23, (6, 3)), normal(24, (2, 2 * 10 - 1))
    mask = lengths_mask([lk - 3, lk], lk)
    out = fast(lambda *a: kernelized_rpe.attend(*a, mask=mask, causal=causal))(q, k, v, projection, rpe)
    np.testing.assert_allclose(out, rpe_reference(q, k, v, projection, rpe, mask, causal), rtol=1e-5, atol=1e-5)


def test_kernelized_rpe_gradients_match_the_materialized_form():
    q, k, v = qkv(25, lq=7, lk=7)
    projection, rpe = normal(28, (6, 3)), normal(29, (2, 13))

    def materialized(q, k, v, rpe):
        phi_q, phi_k = (kernelized_rpe.feature_map(x, projection) for x in (q, k))
        offsets = np.arange(7)[:, None] - np.arange(7)[None, :]
        c = jnp.exp(rpe[:, 6 + offsets] - jax.lax.stop_gradient(rpe.max(-1))[:, None, None]) * (offsets >= 0)
        w = jnp.einsum("bqhm,bkhm->bhqk", phi_q, phi_k) * c
        return jnp.einsum("bhqk,bkhd->bqhd", w, v) / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    fft = lambda q, k, v, rpe: kernelized_rpe.attend(q, k, v, projection, rpe, causal=True)  # noqa: E731
    got = fast(jax.grad(loss(fft), argnums=(0, 1, 2, 3)))(q, k, v, rpe)
    want = fast(jax.grad(loss(materialized), argnums=(0, 1, 2, 3)))(q, k, v, rpe)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[3]).sum()) > 0


def test_kernelized_rpe_with_zero_rpe_is_plain_kernel_attention():
    q, k, v = qkv(30, lq=8, lk=8)
    projection = normal(33, (6, 3))
    phi_q, phi_k = (kernelized_rpe.feature_map(x, projection) for x in (q, k))
    for causal in (False, True):
        out = fast(lambda *a, c=causal: kernelized_rpe.attend(*a, causal=c))(q, k, v, projection, jnp.zeros((2, 15)))
        ref = fast(lambda *a, c=causal: kernel_attention.normalized_attention(*a, causal=c, chunk_size=4))(
            phi_q, phi_k, v)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_kernelized_rpe_approaches_softmax_with_rpe_as_features_grow():
    # Estimates softmax(q^.k^ + b_{i-j}) v (unit-norm q^, k^); mean error over 3 draws must fall with m.
    q, k, v = qkv(34, b=1, lq=16, lk=16, h=2, d=8)
    rpe = normal(37, (2, 31))
    unit = [f64(x) / np.linalg.norm(f64(x), axis=-1, keepdims=True) for x in (q, k)]
    offsets = np.arange(16)[:, None] - np.arange(16)[None, :]
    logits = np.einsum("bqhd,bkhd->bhqk", *unit) + f64(rpe)[:, 15 + offsets][None]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    exact = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), f64(v))
    errors = []
    for m in (16, 128, 1024):
        estimate = lambda key, m=m: kernelized_rpe.attend(q, k, v, kernelized_rpe.random_projection(key, m, 8), rpe)  # noqa: E731
        draws = fast(jax.vmap(estimate))(jax.random.split(jax.random.key(0), 3))
        errors.append(np.mean([np.abs(f64(o) - exact).mean() for o in draws]))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.035, errors


def test_kernelized_rpe_module_max_length_and_refusals():
    q, k, v = qkv(38, lq=6, lk=6)
    module = attention.make("kernelized_rpe", num_features=8, max_length=10)
    variables = jax.eval_shape(module.init, jax.random.key(0), q, k, v)
    assert variables["params"]["rpe"].shape == (2, 19)
    shorter = jax.eval_shape(module.apply, variables, q[:, :4], k[:, :4], v[:, :4])  # the centre of the RPE
    assert shorter.shape == (2, 4, 2, 3)
    with pytest.raises(ValueError, match="kernelized_rpe.*max_length"):
        jax.eval_shape(module.apply, variables, *qkv(38, lq=12, lk=12))
    with pytest.raises(NotImplementedError, match="kernelized_rpe"):
        jax.eval_shape(lambda vs: module.apply(vs, q, k, v, segment_ids=np.zeros((2, 6), int)), variables)


# --- hyena ---------------------------------------------------------------------------------------------------

def hyena_params(seed, length, h=2, d=3, taps=3):
    return dict(filter_forward=normal(seed, (length, h, d)), skip=normal(seed + 1, (h, d)),
                short_taps=normal(seed + 2, (taps, 3, h, d)), short_bias=normal(seed + 3, (3, h, d)),
                filter_backward=normal(seed + 4, (length, h, d)))


def hyena_reference(q, k, v, p, mask, causal):
    """Short causal conv, gates and the long conv done directly (np.convolve), float64, pads zeroed."""
    keep = mask[:, :, None, None, None]
    x = np.where(keep, np.stack([f64(q), f64(k), f64(v)], axis=2), 0.0)
    x = np.where(keep, np_short(x, f64(p["short_taps"]), f64(p["short_bias"])), 0.0)
    gate, u = x[:, :, 0], x[:, :, 2] * x[:, :, 1]
    b, n, h, d = u.shape
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    uf = u.reshape(b, n, h * d)
    if causal:
        y = np_causal(uf, flat(f64(p["filter_forward"])))
    else:
        y = np_two_sided(uf, flat(f64(p["filter_forward"])), flat(f64(p["filter_backward"])))
    return gate * (y.reshape(u.shape) + f64(p["skip"]) * u)


@pytest.mark.parametrize("causal", [True, False])
def test_hyena_equals_direct_convolutions(causal):
    q, k, v = qkv(40, lq=10, lk=10)
    p = hyena_params(43, 10)
    mask = np.array([[False, False] + [True] * 6 + [False] * 2, [True] * 10])  # pads at both ends of row 0
    out = fast(lambda q, k, v, p: hyena.attend(q, k, v, p["filter_forward"], p["skip"], p["short_taps"],
                                                p["short_bias"], filter_backward=p["filter_backward"], mask=mask,
                                                causal=causal))(q, k, v, p)
    np.testing.assert_allclose(out, hyena_reference(q, k, v, p, mask, causal), rtol=1e-5, atol=1e-5)


def test_hyena_causal_never_reads_the_future_and_left_padding_is_inert():
    q, k, v = qkv(48, lq=12, lk=12)
    module = attention.make("hyena", filter_order=8)
    mask = np.array([[False] * 3 + [True] * 9, [True] * 12])
    variables = fast(lambda *a: module.init(*a, causal=True))(jax.random.key(0), q, k, v)
    apply = fast(lambda q, k, v: module.apply(variables, q, k, v, mask=mask, causal=True))
    out = apply(q, k, v)
    t = 7
    bumped = apply(q.at[:, t].add(3.0), k.at[:, t].add(3.0), v.at[:, t].add(3.0))
    np.testing.assert_allclose(bumped[:, :t], out[:, :t], atol=1e-5)
    assert not np.allclose(bumped[:, t:], out[:, t:])
    pads = ~mask[:, :, None, None]
    moved = apply(q + 3.0 * pads, k + 3.0 * pads, v + 3.0 * pads)
    np.testing.assert_allclose(moved[0, 3:], out[0, 3:], atol=1e-5)


def test_hyena_implicit_filter_follows_safari():
    z = hyena.positional_embedding(5, emb_dim=3)
    np.testing.assert_allclose(z[:, 0], np.linspace(0, 1, 5), atol=1e-7)
    w = 2 * np.pi * np.arange(5) / 5 * 1e-4
    np.testing.assert_allclose(z[:, 1:], np.stack([np.cos(w), -np.sin(w)], -1), atol=1e-7)
    rates = hyena.decay_rates(4)
    np.testing.assert_allclose([rates[0], rates[-1]], [np.log(100) / 1.5, np.log(100) / 0.3], rtol=1e-6)
    filt = hyena.ImplicitFilter(channels=4, max_length=8, width=6)
    variables = jax.eval_shape(lambda: filt.init(jax.random.key(0), (8,)))
    assert jax.eval_shape(lambda vs: filt.apply(vs, (8,)), variables).shape == (8, 4)
    assert jax.eval_shape(lambda vs: filt.apply(vs, (5,)), variables).shape == (5, 4)
    with pytest.raises(ValueError, match="hyena.*max_length"):
        jax.eval_shape(lambda vs: filt.apply(vs, (9,)), variables)


def test_hyena_refusals_and_backward_filter_only_when_bidirectional():
    q, k, v = qkv(50, lq=8, lk=8)
    module = attention.make("hyena", filter_order=8)
    causal_vars = jax.eval_shape(lambda: module.init(jax.random.key(0), q, k, v, causal=True))
    assert "filter_backward" not in causal_vars["params"]
    assert "filter_backward" in jax.eval_shape(module.init, jax.random.key(0), q, k, v)["params"]
    with pytest.raises(NotImplementedError, match="hyena"):
        jax.eval_shape(lambda vs: module.apply(vs, q, k, v, causal=True, segment_ids=np.zeros((2, 8), int)),
                       causal_vars)
    with pytest.raises(NotImplementedError, match="hyena"):
        jax.eval_shape(lambda vs: module.apply(vs, q[:, :4], k, v, causal=True), causal_vars)


# --- hyena_nd ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["standard", "flipped", "4dir"])
def test_hyena_nd_equals_direct_2d_convolutions(mode):
    hw, (h, d) = (3, 4), (2, 3)
    q, k, v = qkv(52, lq=12, lk=12, h=h, d=d)
    long_filter, skip = normal(55, (*hw, h, d)), normal(56, (h, d))
    short_kernel, short_bias = normal(57, (3, 3, 3, h, d)), normal(58, (3, h, d))
    mix = (normal(59, (4,)), normal(60, ())) if mode == "4dir" else None
    mask = lengths_mask([9, 12], 12)
    out = fast(lambda q, k, v: hyena_nd.attend(q, k, v, long_filter, skip, short_kernel, short_bias, grid_hw=hw,
                                               directional_mode=mode, mix=mix, mask=mask))(q, k, v)

    keep = mask.reshape(2, *hw, 1, 1, 1)
    x = np.where(keep, np.stack([f64(t) for t in (q, k, v)], axis=2).reshape(2, *hw, 3, h, d), 0.0)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)])
    sk = f64(short_kernel)
    conv = sum(sk[a, b] * padded[:, a:a + hw[0], b:b + hw[1]] for a in range(3) for b in range(3))
    x = np.where(keep, conv + f64(short_bias), 0.0)
    gate, u = x[..., 0, :, :], x[..., 2, :, :] * x[..., 1, :, :]
    flat = lambda t: t.reshape(*t.shape[:3], h * d)  # noqa: E731
    kern = f64(long_filter).reshape(*hw, h * d)
    outs = []
    for axes in hyena_nd.DIRECTIONS[mode]:
        y = np_quadrant(np.flip(flat(u), axes) if axes else flat(u), kern)
        y = (np.flip(y, axes) if axes else y).reshape(u.shape)
        outs.append(gate * (y / (2 * max(hw)) + f64(skip) * u))
    ref = outs[0] if mix is None else sum(float(w) * o for w, o in zip(mix[0], outs, strict=True)) + float(mix[1])
    np.testing.assert_allclose(out, ref.reshape(2, 12, h, d), rtol=1e-5, atol=1e-5)


def test_hyena_nd_4dir_with_one_hot_mix_is_standard():
    q, k, v = qkv(61, lq=16, lk=16)
    args = (normal(64, (4, 4, 2, 3)), normal(65, (2, 3)), normal(66, (3, 3, 3, 2, 3)), normal(67, (3, 2, 3)))
    standard = fast(hyena_nd.attend)(q, k, v, *args)
    one_hot = (jnp.array([1.0, 0, 0, 0]), jnp.zeros(()))
    mixed = fast(lambda *a: hyena_nd.attend(*a, directional_mode="4dir", mix=one_hot))(q, k, v, *args)
    np.testing.assert_allclose(mixed, standard, atol=1e-6)


@pytest.mark.parametrize("filter_2d", [False, True])
def test_hyena_nd_module_filters_and_refusals(filter_2d):
    q, k, v = qkv(68, lq=12, lk=12)
    module = attention.make("hyena_nd", filter_order=8, filter_2d=filter_2d, grid=(3, 4))
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    names = {"filter"} if filter_2d else {"filter_rows", "filter_cols"}
    assert names <= set(variables["params"])
    assert np.all(np.isfinite(fast(module.apply)(variables, q, k, v)))
    with pytest.raises(NotImplementedError, match="hyena_nd"):
        jax.eval_shape(lambda: module.apply(variables, q, k, v, causal=True))
    with pytest.raises(NotImplementedError, match="hyena_nd"):
        jax.eval_shape(lambda: module.apply(variables, q, k, v, segment_ids=np.zeros((2, 12), int)))
    with pytest.raises(ValueError, match="hyena_nd.*perfect square"):
        jax.eval_shape(attention.make("hyena_nd").init, jax.random.key(0), q, k, v)


# --- mamba ---------------------------------------------------------------------------------------------------

def scan_inputs(seed, b=2, n=11, h=2, d=3, s=4):
    return dict(x=normal(seed, (b, n, h, d)), delta=jax.nn.softplus(normal(seed + 1, (b, n, h, d))),
                a_log=normal(seed + 2, (h, d, s), 0.5), b=normal(seed + 3, (b, n, h, s)),
                c=normal(seed + 4, (b, n, h, s)), d_skip=normal(seed + 5, (h, d)))


def np_selective_scan(x, delta, a_log, b, c, d_skip, keep, reset):
    """Mamba's selective_scan_ref as a Python loop in float64, with skipped (keep False) and reset steps."""
    x, delta, a, b, c = f64(x), f64(delta), -np.exp(f64(a_log)), f64(b), f64(c)
    state = np.zeros(x.shape[:1] + a.shape)
    ys = []
    for t in range(x.shape[1]):
        decay = np.exp(delta[:, t, ..., None] * a)
        drive = (delta[:, t] * x[:, t])[..., None] * b[:, t, :, None, :]
        kt, rt = keep[:, t, None, None, None], reset[:, t, None, None, None]
        state = np.where(rt, 0.0, np.where(kt, decay, 1.0)) * state + np.where(kt, drive, 0.0)
        ys.append(np.einsum("bhdn,bhn->bhd", state, c[:, t]))
    return np.stack(ys, axis=1) + f64(d_skip) * x


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_mamba_associative_scan_equals_the_python_loop(chunk_size):
    p = scan_inputs(70)
    keep = np.ones((2, 11), bool)
    keep[0, [2, 3, 9]] = False
    reset = np.zeros((2, 11), bool)
    reset[1, 6] = True
    reset[0, 3] = True  # a reset on a skipped step still restarts the state
    out = fast(lambda p: mamba.selective_scan(**p, keep=keep, reset=reset, chunk_size=chunk_size))(p)
    np.testing.assert_allclose(out, np_selective_scan(**p, keep=keep, reset=reset), rtol=1e-5, atol=1e-5)


def test_mamba_skipped_steps_are_as_if_removed():
    p = scan_inputs(76, b=1)
    keep = np.ones((1, 11), bool)
    keep[0, [1, 4, 5]] = False
    full = fast(lambda p: mamba.selective_scan(**p, keep=keep))(p)
    rows = np.flatnonzero(keep[0])
    short = fast(lambda p: mamba.selective_scan(**p))(
        {name: (val[:, rows] if val.ndim == 4 and val.shape[1] == 11 else val) for name, val in p.items()})
    np.testing.assert_allclose(full[:, rows], short, rtol=1e-5, atol=1e-5)


def test_mamba_init_follows_the_reference():
    params = fast(mamba.DirectionParams(heads=2, head_dim=8, d_state=4).init)(jax.random.key(0))["params"]
    np.testing.assert_allclose(-np.exp(params["a_log"]), np.broadcast_to(-np.arange(1, 5.0), (2, 8, 4)), rtol=1e-6)
    dt = jax.nn.softplus(params["dt_bias"])
    assert params["dt_down"].shape == (16, 1) and float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    np.testing.assert_allclose(params["d_skip"], 1.0)


def test_mamba_causal_leak_padding_and_bidirectional_is_forward_plus_flipped():
    q, k, v = qkv(80, lq=12, lk=12)
    module = attention.make("mamba", d_state=4, chunk_size=5)
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    fwd = variables["params"]["forward"]
    params = mamba.DirectionParams(heads=2, head_dim=3, d_state=4).apply({"params": fwd})
    causal = fast(lambda q, k, v: mamba.attend(q, k, v, params, causal=True, chunk_size=5))
    out = causal(q, k, v)
    t = 6
    bumped = causal(q.at[:, t].add(3.0), k.at[:, t].add(3.0), v.at[:, t].add(3.0))
    np.testing.assert_allclose(bumped[:, :t], out[:, :t], atol=1e-5)
    assert not np.allclose(bumped[:, t:], out[:, t:])

    both = fast(lambda *a: mamba.attend(*a, chunk_size=5))(q, k, v, params, params)
    flipped = causal(*(jnp.flip(x, 1) for x in (q, k, v)))
    np.testing.assert_allclose(both, out + jnp.flip(flipped, 1), rtol=1e-5, atol=1e-5)

    mask = np.array([[False] * 2 + [True] * 7 + [False] * 3, [True] * 12])
    pads = ~mask[:, :, None, None]
    apply = fast(lambda q, k, v: module.apply(variables, q, k, v, mask=mask))
    np.testing.assert_allclose(apply(q + 3 * pads, k - 3 * pads, v + 3 * pads)[:, 2:9], apply(q, k, v)[:, 2:9],
                               atol=1e-5)


def test_mamba_segments_are_isolated_both_ways():
    q, k, v = qkv(84, lq=12, lk=12)
    module = attention.make("mamba", d_state=4, chunk_size=5)
    segments = np.repeat([[0, 1, 2], [0, 1, 2]], [4, 5, 3], axis=1)
    variables = fast(lambda *a: module.init(*a, segment_ids=segments))(jax.random.key(0), q, k, v)
    apply = fast(lambda q, k, v: module.apply(variables, q, k, v, segment_ids=segments))
    out = apply(q, k, v)
    middle = (segments == 1)[:, :, None, None]
    moved = apply(q + 3 * middle, k + 3 * middle, v + 3 * middle)
    np.testing.assert_allclose(moved[:, :4], out[:, :4], atol=1e-5)
    np.testing.assert_allclose(moved[:, 9:], out[:, 9:], atol=1e-5)
    assert not np.allclose(moved[:, 4:9], out[:, 4:9])


def test_mamba_refuses_cross_attention():
    q, k, v = qkv(88, lq=5, lk=8)
    with pytest.raises(NotImplementedError, match="mamba"):
        jax.eval_shape(attention.make("mamba").init, jax.random.key(0), q, k, v)

"""Vision token mixers behind the q/k/v interface, against dense float64 references written here.

Each reference builds its convs, windows, pools and neighbourhoods as dense 0/1 matrices over the grid (no
lax.conv, no window partition, no gathers), so it shares no code path with the method. Values and gradients
are compared in float64 (``jax.enable_x64``) on a non-square 6 x 5 grid with a padded row.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import (
    efficientvit_cga,
    lowtention,
    shiftadd_angular,
    shvit_single_head,
    transnext_aggregated,
    uniformer_local,
)

B, H, D = 2, 2, 4
HW = (6, 5)
L = HW[0] * HW[1]
MASK = np.arange(L)[None, :] < np.array([[22], [L]])  # row 0: 22 real tokens, row 1: all real
GRID_METHODS = ["efficientvit_cga", "transnext_aggregated", "uniformer_local", "lowtention"]
VISION = GRID_METHODS + ["shvit_single_head", "shiftadd_angular"]


def fast(fn):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def qkv(seed, b=B, length=L, h=H, d=D):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (b, length, h, d)) for kk in keys]


def f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def cells(hw):
    return np.divmod(np.arange(hw[0] * hw[1]), hw[1])


def reads(out_hw, in_hw, rule):
    """Static 0/1 [out cells, in cells]: output (y, x) reads input ``rule(y, x)`` when it lies in the grid."""
    m = np.zeros((out_hw[0] * out_hw[1], in_hw[0] * in_hw[1]))
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            yy, xx = rule(y, x)
            if 0 <= yy < in_hw[0] and 0 <= xx < in_hw[1]:
                m[y * out_hw[1] + x, yy * in_hw[1] + xx] = 1.0
    return m


def dense_depthwise(x, kernel, hw, stride=1, restrict=None):
    """Cross-correlation with zero padding k // 2: ``x [b, L, c]``, ``kernel [k, k, c]``; ``restrict [L, L]``."""
    k = kernel.shape[0]
    p = k // 2
    out_hw = ((hw[0] + 2 * p - k) // stride + 1, (hw[1] + 2 * p - k) // stride + 1)
    taps = np.stack([np.stack([reads(out_hw, hw, lambda y, x, a=a, b=b: (y * stride + a - p, x * stride + b - p))
                               for b in range(k)]) for a in range(k)])  # [k, k, out cells, in cells]
    if restrict is not None:
        taps = taps * restrict
    return jnp.einsum("ijol,ijc,nlc->noc", taps, kernel, x), out_hw


def softmax_rows(logits, allowed):
    return jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)


def value_and_grads(fn):
    """Jitted (fn(*args), gradients of sum(sin(fn(*args))) with respect to every argument)."""
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(jnp.cos(out))

    return fast(run)


def check_values_and_grads(ours, reference, args, rtol=1e-5, atol=1e-5):
    """ours(*args) (float32) equals reference(*args) in float64, and so do the gradients of sum(sin)."""
    out, grads = value_and_grads(ours)(*args)
    with jax.enable_x64(True):
        ref, ref_grads = value_and_grads(reference)(*f64(*args))
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max(initial=0.0))))
    return out


def zero_padded(x, mask):
    return jnp.where(mask[:, :, None, None], x, 0.0)


# --- uniformer_local ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [5])
def test_uniformer_local_equals_a_dense_depthwise_conv_of_v(size):
    q, k, v = qkv(0)
    kernel = jax.random.normal(jax.random.key(1), (size, size, H * D))
    bias = jax.random.normal(jax.random.key(2), (H * D,))

    def ours(v, kernel, bias):
        return uniformer_local.attend(q, k, v, kernel, bias, mask=MASK, grid=HW)

    def reference(v, kernel, bias):
        x = zero_padded(v, MASK).reshape(B, L, H * D)
        return (dense_depthwise(x, kernel, HW)[0] + bias).reshape(B, L, H, D)

    check_values_and_grads(ours, reference, (v, kernel, bias))
    # q and k do not enter: the local affinity is a learned a_{i-j}.
    moved = uniformer_local.attend(q + 1.0, k - 1.0, v, kernel, bias, mask=MASK, grid=HW)
    np.testing.assert_array_equal(moved, ours(v, kernel, bias))


# --- shvit_single_head --------------------------------------------------------------------------------------

def test_shvit_slice_widths_follow_the_partial_ratio():
    assert shvit_single_head.slice_widths(64, 1 / 4.67, 16) == (16, 14)
    assert shvit_single_head.slice_widths(128, 0.25, 16) == (16, 32)  # SHViT-S1 stage 1: 32 of 128
    assert shvit_single_head.slice_widths(8, 1 / 4.67, 16) == (8, 2)
    # The reference's stage widths attend its exact counts (round(320 / 4.67) would be 69).
    assert [shvit_single_head.slice_widths(c, 1 / 4.67, 16)[1] for c in (128, 224, 320)] == [32, 48, 68]
    assert shvit_single_head.slice_widths(320, 0.25, 16)[1] == 80
    with pytest.raises(ValueError, match="shvit_single_head: partial_ratio"):
        shvit_single_head.slice_widths(64, 0.0, 16)


@pytest.mark.parametrize("causal,segments", [(False, False), (True, False), (False, True)])
def test_shvit_passes_channels_through_and_attends_the_slice(causal, segments):
    h, d = 4, 8  # 32 channels: qk width 16 (two heads of q/k), attended value width round(32 / 4.67) = 7
    q, k, v = qkv(3, h=h, d=d)
    seg = np.repeat(np.array([[1, 2], [3, 4]]), [12, L - 12], axis=1) if segments else None
    kw = dict(mask=MASK, segment_ids=seg, causal=causal, qk_dim=16)

    def ours(q, k, v):
        return shvit_single_head.attend(q, k, v, **kw)

    def reference(q, k, v):
        qc, kc, vc = (x.reshape(B, L, h * d) for x in (q, k, v))
        logits = jnp.einsum("bqc,bkc->bqk", qc[..., :16], kc[..., :16]) / math.sqrt(16)
        allowed = MASK[:, None, :] & (np.tril(np.ones((L, L), bool)) if causal else True)
        if segments:
            allowed = allowed & (seg[:, :, None] == seg[:, None, :])
        attended = jnp.einsum("bqk,bkc->bqc", softmax_rows(logits, allowed), vc[..., :7])
        return jnp.concatenate([attended, vc[..., 7:]], -1).reshape(B, L, h, d)

    out = check_values_and_grads(ours, reference, (q, k, v))
    np.testing.assert_array_equal(out.reshape(B, L, -1)[..., 7:], v.reshape(B, L, -1)[..., 7:])


# --- lowtention ---------------------------------------------------------------------------------------------

def lowtention_reference(q, k, v, down, up, up_bias, stride):
    """Dense strided convs, masked softmax over low-resolution tokens, dense transposed conv, crop."""
    up_size = up.shape[0]
    low = []
    for x, kernel in zip((q, k, v), down, strict=True):
        y, low_hw = dense_depthwise(zero_padded(x, MASK).reshape(B, L, H * D), kernel, HW, stride)
        low.append(y.reshape(B, -1, H, D))
    # A low-resolution key is real when its stride x stride block [i s, (i + 1) s) holds a real token.
    block = reads(low_hw, HW, lambda y, x: (y * stride, x * stride))
    real = sum(reads(HW, HW, lambda y, x, a=a, b=b: (y + a, x + b)) for a in range(stride) for b in range(stride))
    real = (block @ np.minimum(real, 1) @ MASK.T.astype(float)).T > 0
    logits = jnp.einsum("bqhd,bkhd->bhqk", low[0], low[1]) / math.sqrt(D)
    weights = softmax_rows(logits, real[:, None, None, :])
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, low[2]).reshape(B, -1, H * D)
    pad = stride // 2 if stride > 1 else 1
    lh, lw = low_hw
    # out[y, x] += low[i, j] * up[a, b] where y = i * stride - pad + a (ConvTranspose2d), cropped to HW.
    taps = np.zeros((up_size, up_size, L, lh * lw))
    for a in range(up_size):
        for b in range(up_size):
            for i in range(lh):
                for j in range(lw):
                    y, x = i * stride - pad + a, j * stride - pad + b
                    if 0 <= y < HW[0] and 0 <= x < HW[1]:
                        taps[a, b, y * HW[1] + x, i * lw + j] = 1.0
    result = jnp.einsum("ijol,ijc,nlc->noc", taps, up, out)
    return (result + up_bias).reshape(B, L, H, D)


def test_lowtention_at_stride_1_with_identity_kernels_is_softmax():
    q, k, v = qkv(4)
    delta3 = np.zeros((3, 3, H * D), np.float32)
    delta3[1, 1] = 1.0
    down = np.stack([delta3] * 3)
    out = fast(lambda q, k, v: lowtention.attend(q, k, v, down, delta3, mask=MASK, stride=1, grid=HW))(q, k, v)
    q64, k64, v64 = f64(q, k, v)
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(D)
    logits = np.where(MASK[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(out[MASK], ref[MASK], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 3])  # stride 1: the identity-kernel test above
def test_lowtention_equals_dense_strided_conv_softmax_and_transposed_conv(stride):
    q, k, v = qkv(5)
    size, up_size = lowtention.default_kernel_size(stride), lowtention.up_kernel_size(stride)
    keys = jax.random.split(jax.random.key(6), 3)
    down = 0.3 * jax.random.normal(keys[0], (3, size, size, H * D))
    up = jax.random.normal(keys[1], (up_size, up_size, H * D))
    up_bias = jax.random.normal(keys[2], (H * D,))

    def ours(q, k, v, down, up, up_bias):
        return lowtention.attend(q, k, v, down, up, up_bias, mask=MASK, stride=stride, grid=HW)

    check_values_and_grads(ours, lambda *a: lowtention_reference(*a, stride), (q, k, v, down, up, up_bias))


# --- efficientvit_cga ---------------------------------------------------------------------------------------

def cga_reference(q, k, v, kernels, table, cascade, q_bias, win):
    """Dense cascaded group attention: same-window pair masks, in-window conv matrices, |dy|,|dx| bias."""
    ys, xs = cells(HW)
    window_id = (ys // win[0]) * 100 + xs // win[1]
    same = window_id[:, None] == window_id[None, :]
    dy, dx = np.abs(ys[:, None] - ys[None, :]), np.abs(xs[:, None] - xs[None, :])
    dy, dx = np.minimum(dy, win[0] - 1), np.minimum(dx, win[1] - 1)  # pairs across windows are masked anyway
    outs = []
    for i in range(q.shape[2]):
        qi, ki, vi = q[:, :, i], k[:, :, i], v[:, :, i]
        if i > 0:
            qi, ki, vi = (x + outs[-1] @ cascade[i - 1, j] for j, x in enumerate((qi, ki, vi)))
        qi, ki, vi = (jnp.where(MASK[..., None], x, 0.0) for x in (qi, ki, vi))
        qi = dense_depthwise(qi, kernels[i], HW, restrict=same)[0] + q_bias[i]
        logits = jnp.einsum("bqd,bkd->bqk", qi, ki) / math.sqrt(D) + table[i][dy, dx]
        outs.append(jnp.einsum("bqk,bkd->bqd", softmax_rows(logits, same & MASK[:, None, :]), vi))
    return jnp.stack(outs, axis=2)


@pytest.mark.parametrize("heads,window", [(1, 7), pytest.param(3, 3, marks=pytest.mark.slow)])
def test_efficientvit_cga_equals_dense_cascade_of_window_softmax_with_bias(heads, window):
    q, k, v = qkv(7, h=heads)
    win = efficientvit_cga.window_shape(HW, window)
    keys = jax.random.split(jax.random.key(8), 4 + heads)
    table = jax.random.normal(keys[0], (heads, *win))
    cascade = 0.5 * jax.random.normal(keys[1], (max(heads - 1, 0), 3, D, D))
    q_bias = jax.random.normal(keys[2], (heads, D))
    kernels = [0.3 * jax.random.normal(keys[4 + i], (s, s, D)) for i, s in enumerate((3, 5, 1)[:heads])]

    def ours(q, k, v, table, cascade, q_bias, *kernels):
        return efficientvit_cga.attend(q, k, v, list(kernels), table, cascade if heads > 1 else None, q_bias,
                                       mask=MASK, window=window, grid=HW)

    def reference(q, k, v, table, cascade, q_bias, *kernels):
        return cga_reference(q, k, v, kernels, table, cascade, q_bias, win)

    check_values_and_grads(ours, reference, (q, k, v, table, cascade, q_bias, *kernels))


def test_efficientvit_cga_one_head_identity_conv_is_window_softmax_with_bias():
    q, k, v = qkv(9, h=1)
    win = (3, 3)
    table = np.asarray(jax.random.normal(jax.random.key(10), (1, *win)), np.float64)
    delta = np.zeros((3, 3, D), np.float32)
    delta[1, 1] = 1.0
    out = fast(lambda q, k, v: efficientvit_cga.attend(q, k, v, [delta], table, mask=MASK, window=3, grid=HW))(
        q, k, v)
    q64, k64, v64 = f64(q, k, v)
    ys, xs = cells(HW)
    ref = np.zeros_like(v64)
    for b in range(B):
        for i in range(L):
            keys = [j for j in range(L) if MASK[b, j] and ys[j] // 3 == ys[i] // 3 and xs[j] // 3 == xs[i] // 3]
            logits = np.array([q64[b, i, 0] @ k64[b, j, 0] / math.sqrt(D)
                               + table[0, abs(ys[i] - ys[j]), abs(xs[i] - xs[j])] for j in keys])
            if not MASK[b, i]:
                continue
            w = np.exp(logits - logits.max())
            ref[b, i, 0] = (w / w.sum()) @ v64[b, keys, 0]
    np.testing.assert_allclose(out[MASK], ref[MASK], rtol=1e-5, atol=1e-5)


def test_efficientvit_cga_kernel_sizes_per_head():
    assert efficientvit_cga.head_kernel_sizes((7, 5, 3, 3), 3) == (7, 5, 3)  # EfficientViT-M5 stage 1
    assert efficientvit_cga.head_kernel_sizes((5,), 8) == (5,) * 8
    with pytest.raises(ValueError, match="efficientvit_cga: kernels .* fewer sizes than the 8 heads"):
        efficientvit_cga.head_kernel_sizes((5, 5, 5, 5), 8)
    with pytest.raises(ValueError, match="efficientvit_cga: kernels must be positive odd"):
        efficientvit_cga.head_kernel_sizes((4,), 2)


# --- transnext_aggregated -----------------------------------------------------------------------------------

def adaptive_bins(n, p):
    return [list(range(math.floor(i * n / p), math.ceil((i + 1) * n / p))) for i in range(p)]


def cpb_reference(cpb, pooled):
    """[heads, L, P]: the MLP on sign(x) log2(1 + |x|) / 3 of 8 * (pixel - bin centre) / (size - 1), per pair."""
    w1, b1, w2, b2 = cpb
    rows, cols = adaptive_bins(HW[0], pooled[0]), adaptive_bins(HW[1], pooled[1])
    coords = np.zeros((L, len(rows) * len(cols), 2))
    for i, (y, x) in enumerate(zip(*cells(HW), strict=True)):
        for p, (r, c) in enumerate((r, c) for r in rows for c in cols):
            rel = np.array([(y - np.mean(r)) / (HW[0] - 1) * 8, (x - np.mean(c)) / (HW[1] - 1) * 8])
            coords[i, p] = np.sign(rel) * np.log2(np.abs(rel) + 1) / 3.0
    return jnp.moveaxis(jax.nn.relu(coords @ w1 + b1) @ w2 + b2, -1, 0)


def transnext_reference(q, k, v, emb, temperature, local_bias, tokens, learn_bias, w1, b1, w2, b2, *, window, sr):
    r = window // 2
    ys, xs = cells(HW)
    oy, ox = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # key minus query
    near = (np.abs(oy) <= r) & (np.abs(ox) <= r)
    slot = np.clip((oy + r) * window + (ox + r), 0, window * window - 1)
    q, k, v = (zero_padded(x, MASK) for x in (q, k, v))
    normalize = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-30)
    pooled = (HW[0] // sr, HW[1] // sr)
    member = np.zeros((pooled[0] * pooled[1], L))
    for p, (rows, cols) in enumerate((a, c) for a in adaptive_bins(HW[0], pooled[0])
                                     for c in adaptive_bins(HW[1], pooled[1])):
        member[p] = np.isin(ys, rows) & np.isin(xs, cols)
    counts = np.einsum("pl,bl->bp", member, MASK)
    k_pool = normalize(jnp.einsum("pl,blhd->bphd", member, k) / np.maximum(counts, 1)[..., None, None])
    v_pool = jnp.einsum("pl,blhd->bphd", member, v) / np.maximum(counts, 1)[..., None, None]
    n_keys = (near[None] & MASK[:, None, :]).sum(-1) + (counts > 0).sum(-1, keepdims=True)
    q_norm = normalize(q)
    q_hat = (q_norm + emb) * jax.nn.softplus(temperature)[:, None] * np.log(n_keys)[..., None, None]
    logits_local = jnp.einsum("bihd,bjhd->bhij", q_hat, normalize(k)) + local_bias[:, slot][None]
    logits_pool = jnp.einsum("bihd,bphd->bhip", q_hat, k_pool) + cpb_reference((w1, b1, w2, b2), pooled)[None]
    allowed = np.concatenate([np.broadcast_to((near[None] & MASK[:, None, :])[:, None], (B, 1, L, L)),
                              np.broadcast_to((counts > 0)[:, None, None, :], (B, 1, L, len(member)))], -1)
    weights = softmax_rows(jnp.concatenate([logits_local, logits_pool], -1), allowed)
    dynamic = jnp.einsum("bihd,hdij->bhij", q_norm, tokens[:, :, slot]) + learn_bias[:, slot][None]
    a_local = weights[..., :L] + jnp.where(near, dynamic, 0.0)
    return jnp.einsum("bhij,bjhd->bihd", a_local, v) + jnp.einsum("bhip,bphd->bihd", weights[..., L:], v_pool)


@pytest.mark.parametrize("window,sr", [(5, 1)])
def test_transnext_aggregated_equals_dense_reference(window, sr):
    q, k, v = qkv(11)
    n = window * window
    keys = jax.random.split(jax.random.key(12), 9)
    params = (0.3 * jax.random.normal(keys[0], (H, D)), jax.random.normal(keys[1], (H,)),
              jax.random.normal(keys[2], (H, n)), 0.3 * jax.random.normal(keys[3], (H, D, n)),
              0.3 * jax.random.normal(keys[4], (H, n)), jax.random.normal(keys[5], (2, 16)),
              jax.random.normal(keys[6], (16,)), 0.3 * jax.random.normal(keys[7], (16, H)),
              jax.random.normal(keys[8], (H,)))

    def ours(q, k, v, emb, temperature, local_bias, tokens, learn_bias, *cpb):
        return transnext_aggregated.attend(
            q, k, v, mask=MASK, window=window, sr_ratio=sr, grid=HW, query_embedding=emb, temperature=temperature,
            local_bias=local_bias, cpb=cpb, learnable_tokens=tokens, learnable_bias=learn_bias)

    reference = lambda *a: transnext_reference(*a, window=window, sr=sr)
    out = check_values_and_grads(ours, reference, (q, k, v, *params), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(out))


def test_transnext_border_queries_see_fewer_neighbours_and_sr_1_pools_every_token():
    # Neutral parameters, sr = 1 (every token is a pooled key) and window 1: each query sees itself twice
    # (once local, once pooled) plus every other real token once: softmax over [self, all] keys.
    q, k, v = qkv(13)
    out = fast(lambda q, k, v: transnext_aggregated.attend(q, k, v, mask=MASK, window=1, sr_ratio=1, grid=HW))(
        q, k, v)
    q64, k64, v64 = f64(q, k, v)
    qn = q64 / np.linalg.norm(q64, axis=-1, keepdims=True)
    kn = k64 / np.linalg.norm(k64, axis=-1, keepdims=True)
    n_real = MASK.sum(-1)[:, None, None, None]
    logits = np.einsum("bihd,bjhd->bhij", qn, kn) / 0.24 * np.log(1 + n_real)
    logits = np.where(MASK[:, None, None, :], logits, -np.inf)
    self_logit = np.einsum("bihd,bihd->bhi", qn, kn)[..., None] / 0.24 * np.log(1 + n_real)
    e, e_self = np.exp(logits), np.exp(self_logit)
    ref = (np.einsum("bhij,bjhd->bihd", e, v64) + np.moveaxis(e_self, 1, 2) * v64) / (
        np.moveaxis(e.sum(-1, keepdims=True) + e_self, 1, 2))
    np.testing.assert_allclose(out[MASK], ref[MASK], rtol=1e-5, atol=1e-5)
    # A 3x3 neighbourhood has 4 cells at a corner, 6 on an edge, 9 inside (the reference's border mask).
    real = transnext_aggregated.neighbours(jnp.ones((1, L), bool), HW, 3).sum(-1)[0].reshape(HW)
    assert real[0, 0] == 4 and real[0, 2] == 6 and real[2, 2] == 9 and real[-1, -1] == 4


def test_transnext_cpb_table_deduplicates_offsets():
    table, index = transnext_aggregated.cpb_coordinates((8, 8), (4, 4))
    assert index.shape == (64, 16) and len(table) < 64 * 16
    assert len(np.unique(table, axis=0)) == len(table)
    # Offsets stay within 8 (pixel to bin centre, over size - 1), so the table within log2(9) / log2(8).
    assert np.all(np.abs(table) <= np.log2(9.0) / 3.0)
    # Pixel (0, 0) to the first 2x2 bin (centre 0.5, 0.5) is -0.5 / 7 * 8 per axis; pixel (7, 7) to the last
    # bin (centre 6.5, 6.5) is the opposite. Both through sign(x) log2(|x| + 1) / log2(8).
    raw = -0.5 / 7 * 8
    want = np.sign(raw) * np.log2(abs(raw) + 1) / 3
    np.testing.assert_allclose(table[index[0, 0]], [want, want], rtol=1e-6)
    np.testing.assert_allclose(table[index[63, 15]], [-want, -want], rtol=1e-6)


# --- shiftadd_angular ---------------------------------------------------------------------------------------

def test_shiftadd_binarize_is_a_0_1_code_with_the_clip_gradient():
    x = jax.random.normal(jax.random.key(14), (3, 5, 2, 8))
    b = shiftadd_angular.binarize(x)
    unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_array_equal(b, (unit - unit.mean(-1, keepdims=True) > 0).astype(np.float32))
    g = fast(jax.grad(lambda x: jnp.sum(shiftadd_angular.binarize(x))))(x)
    g_clip = fast(jax.grad(lambda x: jnp.sum(jnp.clip(x / jnp.linalg.norm(x, axis=-1, keepdims=True), 0, 1))))(x)
    np.testing.assert_allclose(g, g_clip, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize,conv", [(False, False), (True, True)])
def test_shiftadd_equals_materialized_half_v_plus_qb_kb_v_over_pi(normalize, conv):
    q, k, v = qkv(15)
    kernel = jax.random.normal(jax.random.key(16), (9, H)) if conv else None

    def ours(q, k, v):
        return shiftadd_angular.attend(q, k, v, kernel, mask=MASK, normalize=normalize)

    def reference(q, k, v):
        q_b, k_b = shiftadd_angular.binarize(q), shiftadd_angular.binarize(k)
        scores = jnp.einsum("bihm,bjhm->bhij", q_b, k_b) * MASK[:, None, None, :]
        v = zero_padded(v, MASK)
        out = 0.5 * v + jnp.einsum("bhij,bjhd->bihd", scores, v) / math.pi
        if normalize:
            out = out / jnp.linalg.norm(out, axis=-1, keepdims=True)
        if conv:
            shifts = [np.eye(L, k=t - 4) for t in range(9)]  # row i reads token i + t - 4
            out = out + sum(jnp.einsum("ij,bjhd->bihd", s, v) * kernel[t][:, None] for t, s in enumerate(shifts))
        return out

    check_values_and_grads(ours, reference, (q, k, v), rtol=1e-5, atol=1e-4)


# --- every method: modules, refusals and bad sizes ----------------------------------------------------------

@pytest.mark.parametrize("name", VISION)
def test_module_defaults_build_and_apply_on_a_square_grid(name):
    q, k, v = qkv(17, length=64, h=4, d=8)
    module = attention.make(name)
    variables = fast(lambda key, q, k, v: module.init(key, q, k, v, mask=np.ones((B, 64), bool)))(
        jax.random.key(0), q, k, v)
    out = fast(lambda vs, q, k, v: module.apply(vs, q, k, v))(variables, q, k, v)
    assert out.shape == q.shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("name", GRID_METHODS)
def test_grid_methods_take_an_explicit_grid_and_reject_non_square_lengths(name):
    q, k, v = qkv(18)
    init = lambda module: fast(lambda q, k, v: module.init(jax.random.key(0), q, k, v))(q, k, v)
    with pytest.raises(ValueError, match=f"{name}: sequence length 30 is not a perfect square"):
        init(attention.make(name))
    with pytest.raises(ValueError, match=f"{name}: grid \\(5, 5\\) has 25 cells"):
        init(attention.make(name, grid=(5, 5)))
    module = attention.make(name, grid=HW)
    out = fast(lambda q, k, v: module.apply(module.init(jax.random.key(0), q, k, v), q, k, v))(q, k, v)
    assert out.shape == q.shape


@pytest.mark.parametrize("name", VISION)
def test_refusals_name_the_method(name):
    q, k, v = qkv(19, length=64)
    module = attention.make(name)
    init = lambda **kw: fast(lambda q, k, v: module.init(jax.random.key(0), q, k, v, **kw))(q, k, v)
    if name != "shvit_single_head":
        with pytest.raises(NotImplementedError, match=f"{name}: causal=True is not supported"):
            init(causal=True)
        with pytest.raises(NotImplementedError, match=f"{name}: segment_ids are not supported"):
            init(segment_ids=np.ones((B, 64), np.int32))
    k2, v2 = k[:, :16], v[:, :16]
    with pytest.raises(NotImplementedError, match=f"{name}: cross attention"):
        fast(lambda q, k, v: module.init(jax.random.key(0), q, k, v))(q, k2, v2)


def test_bad_sizes_raise_value_errors_naming_the_method():
    q, k, v = qkv(20, length=64)
    with pytest.raises(ValueError, match="uniformer_local: kernel_size must be a positive odd int"):
        attention.make("uniformer_local", kernel_size=4).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="lowtention: stride must be a positive int"):
        attention.make("lowtention", stride=0).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="transnext_aggregated: grid \\(8, 8\\) is smaller than sr_ratio 16"):
        attention.make("transnext_aggregated", sr_ratio=16).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="transnext_aggregated: window must be a positive odd int"):
        attention.make("transnext_aggregated", window=2).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="efficientvit_cga: window must be a positive int"):
        attention.make("efficientvit_cga", window=0).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="shiftadd_angular: res_kernel_size must be a positive odd int"):
        attention.make("shiftadd_angular", res_kernel_size=2).init(jax.random.key(0), q, k, v)

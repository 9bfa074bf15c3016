"""Linear-family methods against float64 materialized references: the segmented kernel attention form,
scattered_linear, performer_relu, slab_sla, essa and rala, plus their special cases, gradients and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import (
    essa,
    kernel_attention,
    linear_elu,
    performer,
    performer_relu,
    rala,
    scattered_linear,
    slab_sla,
)


def fast(fn):
    """jax.jit without XLA's backend optimizations: they cost most of these small tests' CPU time."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def qkv(seed, b=2, lq=12, lk=12, h=2, d=8, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [scale * jax.random.normal(kk, (b, n, h, d)) for kk, n in zip(keys, (lq, lk, lk), strict=True)]


def f64(x):
    return np.asarray(x, np.float64)


def lengths_mask(lengths, n):
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def visible(b, lq, lk, mask=None, segments=None, causal=False):
    """Boolean [b, 1, lq, lk] of the query/key pairs that may attend."""
    ok = np.ones((b, 1, lq, lk), bool)
    if mask is not None:
        ok &= np.asarray(mask, bool)[:, None, None, :]
    if segments is not None:
        ok &= (segments[:, :, None] == segments[:, None, :])[:, None]
    if causal:
        ok &= np.arange(lq)[:, None] + (lk - lq) >= np.arange(lk)[None, :]
    return ok


def normalized(phi_q, phi_k, v, ok, eps=kernel_attention.EPS):
    """sum_j w_ij v_j / sum_j w_ij with w = phi_q . phi_k on the visible pairs, float64; 2 eps added to
    denominators <= eps."""
    w = np.where(ok, np.einsum("bqhm,bkhm->bhqk", f64(phi_q), f64(phi_k)), 0.0)
    den = w.sum(-1).transpose(0, 2, 1)[..., None]
    return np.einsum("bhqk,bkhd->bqhd", w, f64(v)) / np.where(np.abs(den) <= eps, den + 2 * eps, den)


def relu(x):
    return np.maximum(f64(x), 0.0)


def depthwise_conv(x, kernel, bias, hw):
    """Direct zero-padded 'same' cross-correlation of x [b, h*w, c] with kernel [kh, kw, c], float64."""
    b, _, c = x.shape
    kh, kw, _ = kernel.shape
    grid = np.pad(f64(x).reshape(b, *hw, c), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((b, *hw, c)) + f64(bias)
    for dy in range(kh):
        for dx in range(kw):
            out += f64(kernel)[dy, dx] * grid[:, dy:dy + hw[0], dx:dx + hw[1]]
    return out.reshape(b, hw[0] * hw[1], c)


# Non-contiguous groups with arbitrary ids (negative, large, repeated after a gap), and a padded tail in row 0.
SEGMENTS = np.array([[7, 7, -3, -3, -3, 7, 100, 100, 5, 5, 5, 5],
                     [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3]])
MASK = lengths_mask([9, 12], 12)


# --- the segmented form of the shared kernel attention -------------------------------------------------

def test_segment_labels_are_equal_exactly_where_ids_are_equal():
    labels = np.asarray(kernel_attention.segment_labels("t", SEGMENTS, 2, 12, 12))
    assert labels.min() >= 0 and labels.max() < 12
    np.testing.assert_array_equal(labels[:, :, None] == labels[:, None, :],
                                  SEGMENTS[:, :, None] == SEGMENTS[:, None, :])


@pytest.mark.parametrize("log_scale", [False, True])
def test_normalized_attention_with_segments_equals_materialized(log_scale):
    keys = jax.random.split(jax.random.key(0), 4)
    phi_q, phi_k = (jnp.exp(0.5 * jax.random.normal(kk, (2, 12, 3, 5))) for kk in keys[:2])
    v = jax.random.normal(keys[2], (2, 12, 3, 4))
    # Log-scales up to 300 (exp overflows float32): units must be per segment, or small segments vanish.
    scale = 300.0 * jax.random.uniform(keys[3], (2, 12, 3)) if log_scale else None
    out = fast(lambda *a: kernel_attention.normalized_attention(*a, mask=MASK, segment_ids=SEGMENTS,
                                                                key_log_scale=scale, eps=0.0))(phi_q, phi_k, v)
    ok = visible(2, 12, 12, MASK, SEGMENTS)
    phi_k64 = f64(phi_k)
    if log_scale:
        s = f64(scale)
        shift = np.where(ok, s.transpose(0, 2, 1)[:, :, None, :], -np.inf).max(-1)  # [b, h, q]
        w = np.einsum("bqhm,bkhm->bhqk", f64(phi_q), phi_k64) * np.exp(
            np.minimum(s.transpose(0, 2, 1)[:, :, None, :] - shift[..., None], 0.0))
        w = np.where(ok, w, 0.0)
        ref = np.einsum("bhqk,bkhd->bqhd", w, f64(v)) / w.sum(-1).transpose(0, 2, 1)[..., None]
    else:
        ref = normalized(phi_q, phi_k, v, ok, eps=0.0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_linear_attention_equals_materialized_unnormalized_sum():
    phi_q, phi_k, v = qkv(1)
    for segments in (None, SEGMENTS):
        out = fast(lambda *a, s=segments: kernel_attention.linear_attention(*a, mask=MASK, segment_ids=s))(
            phi_q, phi_k, v)
        w = np.where(visible(2, 12, 12, MASK, segments),
                     np.einsum("bqhm,bkhm->bhqk", f64(phi_q), f64(phi_k)), 0.0)
        np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", w, f64(v)), rtol=1e-5, atol=1e-5)


def test_segmented_kernel_attention_refusals():
    phi = jnp.ones((2, 12, 1, 3))
    with pytest.raises(NotImplementedError, match="t: segment_ids with causal=True"):
        kernel_attention.normalized_attention(phi, phi, phi, segment_ids=SEGMENTS, causal=True, method="t")
    with pytest.raises(ValueError, match="t: segment_ids must have shape"):
        kernel_attention.normalized_attention(phi, phi, phi, segment_ids=SEGMENTS[:, :5], method="t")
    with pytest.raises(ValueError, match="t: segment_ids must have shape"):
        kernel_attention.linear_attention(phi[:, :5], phi, phi, segment_ids=SEGMENTS, method="t")


# --- scattered_linear ---------------------------------------------------------------------------------

def test_scattered_linear_equals_per_segment_materialized_relu_attention():
    q, k, v = qkv(2)
    out = fast(lambda *a: scattered_linear.attend(*a, mask=MASK, segment_ids=SEGMENTS))(q, k, v)
    np.testing.assert_allclose(out, normalized(relu(q), relu(k), v, visible(2, 12, 12, MASK, SEGMENTS)),
                               rtol=1e-5, atol=1e-6)


def test_scattered_linear_equals_running_each_segment_alone():
    q, k, v = qkv(3)
    out = np.asarray(scattered_linear.attend(q, k, v, segment_ids=SEGMENTS))
    alone = fast(scattered_linear.attend)
    for seg in np.unique(SEGMENTS[1]):  # row 1: four interleaved segments of 3 tokens, one compile
        idx = np.flatnonzero(SEGMENTS[1] == seg)
        np.testing.assert_allclose(out[1, idx], alone(*(x[1:, idx] for x in (q, k, v)))[0], rtol=1e-5, atol=1e-6)


def test_scattered_linear_without_segments_is_one_group_and_allows_cross_attention():
    q, k, v = qkv(4, lq=5, lk=12)
    out = fast(lambda *a: scattered_linear.attend(*a, mask=MASK))(q, k, v)
    np.testing.assert_allclose(out, normalized(relu(q), relu(k), v, visible(2, 5, 12, MASK)), rtol=1e-5, atol=1e-6)


def test_scattered_linear_gradients_match_materialized_reference():
    q, k, v = qkv(5)

    def materialized(q, k, v):
        ok = visible(2, 12, 12, MASK, SEGMENTS)
        w = jnp.where(ok, jnp.einsum("bqhm,bkhm->bhqk", jax.nn.relu(q), jax.nn.relu(k)), 0.0)
        den = jnp.sum(w, -1).transpose(0, 2, 1)[..., None]
        return jnp.einsum("bhqk,bkhd->bqhd", w, v) / jnp.where(den <= 1e-6, den + 2e-6, den)

    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    ours = fast(jax.grad(loss(lambda *a: scattered_linear.attend(*a, mask=MASK, segment_ids=SEGMENTS)),
                         argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        ref = jax.grad(loss(materialized), argnums=(0, 1, 2))(*(f64(x) for x in (q, k, v)))
    for g, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


# --- performer_relu -----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_performer_relu_module_equals_normalized_relu_attention_on_projected_features(causal):
    q, k, v = qkv(6)
    module = attention.make("performer_relu", num_features=24, chunk_size=4)
    params = fast(module.init)(jax.random.key(0), q, k, v)
    proj = f64(params["params"]["frozen_projection"])
    assert proj.shape == (24, 8)
    out = fast(lambda *a: module.apply(params, *a, mask=MASK, causal=causal))(q, k, v)
    phi = lambda x: relu(f64(x) @ proj.T) + 1e-3
    np.testing.assert_allclose(out, normalized(phi(q), phi(k), v, visible(2, 12, 12, MASK, causal=causal)),
                               rtol=1e-5, atol=1e-6)


def test_performer_relu_deterministic_features_and_segments():
    q, k, v = qkv(7)
    module = attention.make("performer_relu", random_features=False)
    out = module.apply({}, q, k, v, mask=MASK, segment_ids=SEGMENTS)
    phi = lambda x: relu(x) + 1e-3
    np.testing.assert_allclose(out, normalized(phi(q), phi(k), v, visible(2, 12, 12, MASK, SEGMENTS)),
                               rtol=1e-5, atol=1e-6)


def test_performer_relu_error_against_the_exact_relu_kernel_falls_as_features_grow():
    """E[relu(w.x) relu(w.y)] over Gaussian rows w is the order-1 arc-cosine kernel
    |x||y| (sin t + (pi - t) cos t) / (2 pi); with the 1e-3 offsets the limit weight is that plus
    1e-3 (|x| + |y|) / sqrt(2 pi) per feature, + 1e-6 (the common factor m cancels in the normalization)."""
    q, k, v = qkv(8, b=1, lq=16, lk=16, d=16)
    xq, xk = f64(q), f64(k)
    nq, nk = np.linalg.norm(xq, axis=-1), np.linalg.norm(xk, axis=-1)  # [b, l, h]
    cos = np.clip(np.einsum("bqhd,bkhd->bhqk", xq, xk) / np.einsum("bqh,bkh->bhqk", nq, nk), -1.0, 1.0)
    t = np.arccos(cos)
    norms = np.einsum("bqh,bkh->bhqk", nq, nk)
    w = norms * (np.sin(t) + (np.pi - t) * cos) / (2 * np.pi)
    w += 1e-3 * (nq.transpose(0, 2, 1)[..., None] + nk.transpose(0, 2, 1)[:, :, None, :]) / np.sqrt(2 * np.pi) + 1e-6
    exact = np.einsum("bhqk,bkhd->bqhd", w, f64(v)) / w.sum(-1).transpose(0, 2, 1)[..., None]
    errors = []
    for m in (16, 64, 256):
        draw_and_attend = lambda key, m=m: performer_relu.attend(q, k, v, performer.random_projection(key, m, 16))
        outs = fast(jax.vmap(draw_and_attend))(jax.random.split(jax.random.key(m), 4))
        errors.append(float(np.mean(np.abs(f64(outs) - exact))))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


def test_performer_relu_redraw_and_frozen_projection():
    q, k, v = qkv(9)
    module = attention.make("performer_relu", num_features=16, redraw=True)
    params = fast(module.init)(jax.random.key(0), q, k, v)
    stored = fast(module.apply)(params, q, k, v)
    train = fast(lambda key: module.apply(params, q, k, v, deterministic=False, rngs={"random": key}))
    np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
    assert not np.allclose(train(jax.random.key(1)), stored)
    grads = fast(jax.grad(lambda p: jnp.sum(module.apply(p, q, k, v, causal=True) ** 2)))(params)
    np.testing.assert_array_equal(grads["params"]["frozen_projection"], 0.0)


def test_performer_relu_refusals_name_the_method():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="performer_relu: projection must have shape"):
        performer_relu.attend(q, k, v, jnp.ones((4, 3)))
    with pytest.raises(NotImplementedError, match="performer_relu: segment_ids with causal=True"):
        performer_relu.attend(q, k, v, segment_ids=SEGMENTS, causal=True)
    with pytest.raises(ValueError, match="performer_relu: num_features"):
        attention.make("performer_relu", num_features=0).init(jax.random.key(0), q, k, v)


# --- slab_sla -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_slab_sla_equals_materialized_relu_attention_plus_direct_dwc(hw):
    length = hw[0] * hw[1]
    q, k, v = qkv(11, lq=length, lk=length)
    mask = lengths_mask([length - 4, length], length)
    module = attention.make("slab_sla", grid=None if hw[0] == hw[1] else hw)
    params = fast(module.init)(jax.random.key(1), q, k, v)
    kernel, bias = (f64(params["params"][n]) for n in ("dwc_kernel", "dwc_bias"))
    assert kernel.shape == (5, 5, 8) and bias.shape == (8,) and np.abs(kernel).max() <= 0.2
    out = fast(lambda *a: module.apply(params, *a, mask=mask))(q, k, v)
    v_real = np.where(mask[:, :, None, None], f64(v), 0.0)
    per_head = v_real.transpose(0, 2, 1, 3).reshape(4, length, 8)  # one conv shared by the heads
    dwc = depthwise_conv(per_head, kernel, bias, hw).reshape(2, 2, length, 8).transpose(0, 2, 1, 3)
    ref = normalized(relu(q), relu(k), v, visible(2, length, length, mask)) + dwc
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_slab_sla_with_a_zero_dwc_is_relu_linear_attention():
    q, k, v = qkv(12, lq=16, lk=16)
    out = slab_sla.attend(q, k, v, jnp.zeros((5, 5, 8)), mask=lengths_mask([10, 16], 16))
    np.testing.assert_allclose(out, scattered_linear.attend(q, k, v, mask=lengths_mask([10, 16], 16)),
                               rtol=1e-6, atol=1e-6)


def test_slab_sla_refusals_and_bad_sizes_name_the_method():
    q, k, v = qkv(13, lq=16, lk=16)
    kernel = jnp.zeros((5, 5, 8))
    with pytest.raises(NotImplementedError, match="slab_sla: causal=True is not supported"):
        slab_sla.attend(q, k, v, kernel, causal=True)
    with pytest.raises(NotImplementedError, match="slab_sla: segment_ids are not supported"):
        slab_sla.attend(q, k, v, kernel, segment_ids=np.zeros((2, 16), np.int32))
    with pytest.raises(NotImplementedError, match="slab_sla: cross attention"):
        slab_sla.attend(q[:, :4], k, v, kernel)
    with pytest.raises(ValueError, match="slab_sla: sequence length 12 is not a perfect square"):
        slab_sla.attend(*qkv(13), kernel)
    with pytest.raises(ValueError, match="slab_sla: kernel_size must be a positive odd int"):
        attention.make("slab_sla", kernel_size=4).init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="slab_sla: dwc_kernel must have shape"):
        slab_sla.attend(q, k, v, jnp.zeros((5, 5, 3)))


# --- essa ---------------------------------------------------------------------------------------------

def essa_reference(q, k, v, mask):
    """ESSA.py's ESSAttn per head (after its qkv Linear), padded keys zeroed, N = number of real keys."""
    def share(x):
        x = f64(x) - f64(x).mean(-1, keepdims=True)
        return x**2 / ((x**2).sum(-1, keepdims=True) + 1e-7)

    q2 = share(q)
    q2 = q2 / np.maximum(np.linalg.norm(q2, axis=-1, keepdims=True), 1e-12)
    k2 = np.where(mask[:, :, None, None], share(k), 0.0)
    k2 = k2 / np.maximum(np.linalg.norm(k2, axis=1, keepdims=True), 1e-12)
    v_real = np.where(mask[:, :, None, None], f64(v), 0.0)
    t2 = np.einsum("bqhc,bkhc,bkhd->bqhd", q2, k2, v_real) / np.sqrt(mask.sum(1))[:, None, None, None]
    return f64(v) + t2


def test_essa_equals_materialized_official_formula():
    q, k, v = qkv(14, scale=2.0)
    out = fast(lambda *a: essa.attend(*a, mask=MASK))(q, k, v)
    np.testing.assert_allclose(out, essa_reference(q, k, v, MASK), rtol=1e-5, atol=1e-6)
    # Without a mask every token is real.
    np.testing.assert_allclose(essa.attend(q, k, v), essa_reference(q, k, v, np.ones((2, 12), bool)),
                               rtol=1e-5, atol=1e-6)


def test_essa_gradients_match_materialized_reference_and_survive_constant_tokens():
    q, k, v = qkv(15)
    q = q.at[0, 3].set(0.5)  # constant over channels (exactly, in float32): centred to 0, its norm must not give NaN
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))

    def materialized(q, k, v):
        def share(x):
            x = x - x.mean(-1, keepdims=True)
            return x**2 / ((x**2).sum(-1, keepdims=True) + 1e-7)

        q2 = share(q)
        q2 = q2 / jnp.maximum(jnp.sqrt(jnp.sum(q2**2, -1, keepdims=True)), 1e-12)
        k2 = jnp.where(MASK[:, :, None, None], share(k), 0.0)
        k2 = k2 / jnp.sqrt(jnp.sum(k2**2, 1, keepdims=True))
        t2 = jnp.einsum("bqhc,bkhc,bkhd->bqhd", q2, k2, jnp.where(MASK[:, :, None, None], v, 0.0))
        return v + t2 / np.sqrt(MASK.sum(1))[:, None, None, None]

    ours = fast(jax.grad(loss(lambda *a: essa.attend(*a, mask=MASK)), argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        ref = jax.grad(loss(materialized), argnums=(0, 1, 2))(*(f64(x) for x in (q, k, v)))
    for g, r in zip(ours, ref, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, np.nan_to_num(r), rtol=1e-3, atol=1e-4 * np.abs(np.nan_to_num(r)).max())


def test_essa_refusals_name_the_method():
    q, k, v = qkv(16)
    with pytest.raises(NotImplementedError, match="essa: causal=True is not supported"):
        essa.attend(q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match="essa: segment_ids are not supported"):
        essa.attend(q, k, v, segment_ids=SEGMENTS)
    with pytest.raises(NotImplementedError, match="essa: cross attention"):
        essa.attend(q[:, :5], k, v)
    with pytest.raises(ValueError, match="essa: mask must have shape"):
        essa.attend(q, k, v, mask=np.ones((2, 3), bool))


# --- rala ---------------------------------------------------------------------------------------------

def rope_reference(x, hw):
    """2-D RoPE as complex rotations: pair (2i, 2i+1) of x times exp(1j * pos * angle_i), pos the row index
    for the first half of the pairs and the column index for the second half; float64."""
    d = x.shape[-1]
    angle = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, d // 4)
    rows, cols = np.divmod(np.arange(hw[0] * hw[1]), hw[1])
    theta = np.concatenate([rows[:, None] * angle, cols[:, None] * angle], axis=1)  # [l, d/2]
    z = (f64(x)[..., 0::2] + 1j * f64(x)[..., 1::2]) * np.exp(1j * theta)[None, :, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def rala_reference(q, k, v, mask, hw, kernel, bias):
    """GateLinearAttentionNoSilu without the gate o and proj: elu+1 features, alpha-reweighted keys (k * alpha
    * N), RoPE on the numerator only, means over the N real keys, + LePE(v); float64."""
    phi = lambda x: np.where(f64(x) > 0, f64(x) + 1.0, np.exp(f64(x)))
    real = mask[:, :, None, None]
    n = mask.sum(1)[:, None, None, None].astype(np.float64)
    phi_q, phi_k = phi(q), phi(k)
    q_mean = (phi_q * real).sum(1, keepdims=True) / n
    logits = np.einsum("bohd,blhd->blh", q_mean, phi_k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, :, None], logits, -np.inf)
    alpha = np.exp(logits - logits.max(1, keepdims=True))
    alpha /= alpha.sum(1, keepdims=True)
    k_aug = np.where(real, phi_k * alpha[..., None] * n, 0.0)
    v_real = np.where(real, f64(v), 0.0)
    kv = np.einsum("blhm,blhd->bhmd", rope_reference(k_aug, hw), v_real) / n[:, 0, 0, 0, None, None, None]
    z = 1.0 / (np.einsum("bqhm,bhm->bqh", phi_q, k_aug.sum(1) / n[:, 0]) + 1e-6)
    res = np.einsum("bqhm,bhmd->bqhd", rope_reference(phi_q, hw), kv) * z[..., None]
    b, length, h, d = v.shape
    return res + depthwise_conv(v_real.reshape(b, length, h * d), kernel, bias, hw).reshape(v.shape)


@pytest.mark.parametrize("hw", [(4, 4), (3, 4)])
def test_rala_equals_materialized_official_core(hw):
    length = hw[0] * hw[1]
    q, k, v = qkv(17, lq=length, lk=length)
    mask = lengths_mask([length - 3, length], length)
    module = attention.make("rala", grid=None if hw[0] == hw[1] else hw)
    params = fast(module.init)(jax.random.key(2), q, k, v)
    kernel = f64(params["params"]["lepe_kernel"])
    assert kernel.shape == (5, 5, 16)
    bias = 0.1 * np.arange(16.0)  # nonzero, so the reference checks the bias too
    params = {"params": {"lepe_kernel": params["params"]["lepe_kernel"], "lepe_bias": jnp.asarray(bias)}}
    out = fast(lambda *a: module.apply(params, *a, mask=mask))(q, k, v)
    np.testing.assert_allclose(out, rala_reference(q, k, v, mask, hw, kernel, bias), rtol=1e-5, atol=1e-5)


def test_rala_with_uniform_weights_and_no_rope_is_elu_linear_attention():
    q, k, v = qkv(18, lq=16, lk=16)
    mask = lengths_mask([11, 16], 16)
    out = rala.attend(q, k, v, mask=mask, rope=False, reweight=False)
    np.testing.assert_allclose(out, linear_elu.attend(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
    # The key weights matter: with them the result differs.
    assert not np.allclose(rala.attend(q, k, v, mask=mask, rope=False), out, atol=1e-3)


def test_rala_rope_is_a_rotation_that_depends_on_grid_offsets_only():
    hw = (4, 6)
    a, b = jax.random.normal(jax.random.key(19), (2, 8))
    tile = lambda x: jnp.broadcast_to(x, (1, 24, 1, 8))
    ra, rb = rala.rope_2d(tile(a), hw)[0, :, 0], rala.rope_2d(tile(b), hw)[0, :, 0]
    np.testing.assert_allclose(jnp.linalg.norm(ra, axis=-1), jnp.linalg.norm(a), rtol=1e-5)
    pos = lambda r, c: r * hw[1] + c
    np.testing.assert_allclose(ra[pos(0, 1)] @ rb[pos(2, 3)], ra[pos(1, 2)] @ rb[pos(3, 4)], rtol=1e-5)
    assert not np.isclose(ra[pos(0, 1)] @ rb[pos(2, 3)], ra[pos(0, 1)] @ rb[pos(3, 3)])


def test_rala_gradients_are_finite_and_reach_q_k_v_and_the_lepe():
    q, k, v = qkv(20, lq=16, lk=16)
    module = attention.make("rala")
    params = fast(module.init)(jax.random.key(0), q, k, v)
    mask = lengths_mask([9, 16], 16)
    grads = fast(jax.grad(lambda p, *a: jnp.sum(jnp.sin(module.apply(p, *a, mask=mask))), argnums=(0, 1, 2, 3)))(
        params, q, k, v)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_rala_refusals_and_bad_sizes_name_the_method():
    q, k, v = qkv(21, lq=16, lk=16)
    with pytest.raises(NotImplementedError, match="rala: causal=True is not supported"):
        rala.attend(q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match="rala: segment_ids are not supported"):
        rala.attend(q, k, v, segment_ids=np.zeros((2, 16), np.int32))
    with pytest.raises(NotImplementedError, match="rala: cross attention"):
        rala.attend(q[:, :4], k, v)
    with pytest.raises(ValueError, match="rala: the 2-D RoPE needs head_dim divisible by 4"):
        rala.attend(*qkv(21, lq=16, lk=16, d=6))
    with pytest.raises(ValueError, match="rala: grid"):
        rala.attend(q, k, v, grid=(3, 5))

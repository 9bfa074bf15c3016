"""Softmax variants (scatterbrain, probsparse, primer_mdha) and Informer's distilling layer against float64
numpy references written here from each paper's definition, plus their special cases and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import performer, primer_mdha, probsparse, scatterbrain
from effjax.models import distil

B, H, D = 2, 2, 8


def fast(fn):
    """jax.jit without XLA's backend optimizations: they cost most of these small tests' CPU time."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def qkv(seed, lq=13, lk=None, d=D, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    lk = lk or lq
    return [jax.random.normal(kk, (B, n, H, d), dtype) for kk, n in zip(keys, (lq, lk, lk), strict=True)]


def lengths_mask(lengths, n):
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def visible(lq, lk, mask=None, causal=False):
    """Boolean [B, 1, lq, lk] of pairs that may attend; causal aligned to the end like common.allowed_pairs."""
    ok = np.ones((B, 1, lq, lk), bool)
    if mask is not None:
        ok &= np.asarray(mask, bool)[:, None, None, :]
    if causal:
        ok &= np.arange(lq)[:, None] + (lk - lq) >= np.arange(lk)[None, :]
    return ok


def check_directional_derivative(fn, args, seed=0, eps=1e-2):
    """The gradient of a random projection of ``fn(*args)`` against a central difference along a random
    direction (float32, so the tolerance is loose; a wrong gradient is off by far more)."""
    keys = jax.random.split(jax.random.key(seed), len(args) + 1)
    weights = jax.random.normal(keys[0], jax.eval_shape(fn, *args).shape)
    directions = [jax.random.normal(kk, a.shape) for kk, a in zip(keys[1:], args, strict=True)]
    loss = fast(lambda *a: jnp.sum(fn(*a) * weights))
    grads = fast(jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=tuple(range(len(args)))))(*args)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, directions, strict=True))
    shifted = [[a + sign * eps * d for a, d in zip(args, directions, strict=True)] for sign in (1, -1)]
    numeric = (float(loss(*shifted[0])) - float(loss(*shifted[1]))) / (2 * eps)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def softmax_reference(q, k, v, ok):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.where(ok, np.exp(s - s.max(-1, keepdims=True)), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


# --- scatterbrain -----------------------------------------------------------------------------------

def scatterbrain_reference(q, k, v, projection, mask, causal, window):
    """Materialized float64 definition: exp(q.k/sqrt d) on the band, the Performer estimate (cosh features)
    off it, over the visible keys, normalized."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, projection))
    w = np.concatenate([w, -w])
    d = q.shape[-1]

    def phi(x):
        x = x * d ** -0.25
        return np.exp(np.einsum("blhd,md->blhm", x, w) - 0.5 * (x * x).sum(-1, keepdims=True)) / np.sqrt(len(w))

    estimate = np.einsum("bqhm,bkhm->bhqk", phi(q), phi(k))
    exact = np.exp(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d))
    lq, lk = q.shape[1], k.shape[1]
    i, j = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
    band = (j - i >= -(window // 2)) & (j - i < window - window // 2)
    weights = np.where(visible(lq, lk, mask, causal), np.where(band, exact, estimate), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v) / weights.sum(-1).transpose(0, 2, 1)[..., None]


def projection(seed, rows=16, d=D):
    return performer.random_projection(jax.random.key(seed), rows, d)


@pytest.mark.parametrize("causal,lq,lk,window", [(False, 13, 13, 3), (True, 13, 13, 3), (True, 7, 13, 6)])
def test_scatterbrain_equals_materialized_definition(causal, lq, lk, window):
    q, k, v = qkv(0, lq, lk)
    w = projection(1)
    mask = lengths_mask([lk - 4, lk], lk)
    out = fast(lambda *a: scatterbrain.attend(*a, mask=mask, causal=causal, window=window))(q, k, v, w)
    ref = scatterbrain_reference(q, k, v, w, mask, causal, window)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_scatterbrain_window_covering_everything_is_softmax(causal):
    q, k, v = qkv(2, 13)
    mask = lengths_mask([9, 13], 13)
    out = fast(lambda *a: scatterbrain.attend(*a, mask=mask, causal=causal, window=26))(q, k, v, projection(3))
    ref = softmax_reference(q, k, v, visible(13, 13, mask, causal))
    np.testing.assert_allclose(out[0, :9], ref[0, :9], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_scatterbrain_window_zero_is_performer(causal):
    # performer adds 1e-6 to query features and to the denominator, so they agree to ~1e-3 only.
    q, k, v = qkv(4, 13)
    w = projection(5)
    mask = lengths_mask([9, 13], 13)
    out = fast(lambda *a: scatterbrain.attend(*a, mask=mask, causal=causal, window=0))(q, k, v, w)
    both = jnp.concatenate([w, -w])  # the cosh features are the positive features of [W; -W]
    ref = fast(lambda *a: performer.attend(*a, mask=mask, causal=causal, chunk_size=4))(q, k, v, both)
    np.testing.assert_allclose(out[0, :9], ref[0, :9], atol=3e-3)
    np.testing.assert_allclose(out[1], ref[1], atol=3e-3)


def test_scatterbrain_error_vs_softmax_falls_as_the_band_grows():
    # q = k puts the largest scores on the diagonal; 8 projection rows make the Performer estimate poor,
    # so the exact band must cut the error (measured 0.237, 0.140, 0.067 at windows 0, 8, 32).
    q, _, v = qkv(6, 32)
    w = projection(7, rows=8)
    ref = softmax_reference(q, q, v, visible(32, 32))
    attend = jax.jit(lambda q, v, w, win: scatterbrain.attend(q, q, v, w, window=win), static_argnums=3,
                     compiler_options={"xla_backend_optimization_level": 0})
    errors = [float(np.abs(attend(q, v, w, win) - ref).mean()) for win in (0, 8, 32)]
    assert errors[1] < 0.75 * errors[0] and errors[2] < 0.6 * errors[1], errors


def test_scatterbrain_module_defaults_and_frozen_projection():
    q, k, v = qkv(8, 16, d=16)
    module = attention.make("scatterbrain")
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    w = variables["params"]["frozen_projection"]
    assert w.shape == (scatterbrain.default_num_features(16), 16) == (44, 16)  # floor(16 ln 16)
    out, grads = fast(jax.value_and_grad(lambda vs: jnp.sum(module.apply(vs, q, k, v) ** 2)))(variables)
    ref = fast(lambda q, k, v, w: jnp.sum(scatterbrain.attend(q, k, v, w, window=49) ** 2))(q, k, v, w)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert float(jnp.abs(grads["params"]["frozen_projection"]).max()) == 0.0


def test_scatterbrain_refusals_and_bad_sizes():
    q, k, v = qkv(9)
    with pytest.raises(NotImplementedError, match="scatterbrain.*segment_ids"):
        scatterbrain.attend(q, k, v, projection(0), segment_ids=np.zeros((B, 13), int))
    with pytest.raises(ValueError, match="scatterbrain.*window"):
        scatterbrain.attend(q, k, v, projection(0), window=-1)
    with pytest.raises(ValueError, match="scatterbrain.*projection"):
        scatterbrain.attend(q, k, v, projection(0, d=4))


def test_scatterbrain_gradients_match_finite_differences():
    q, k, v = (x[:1, :6] for x in qkv(10, 6))
    w = projection(11, rows=4)
    check_directional_derivative(lambda q, k, v: scatterbrain.attend(q, k, v, w, causal=True, window=3), (q, k, v))


# --- probsparse ---------------------------------------------------------------------------------------

def probsparse_reference(q, k, v, mask, causal, factor, index, quirks=False):
    """float64 Algorithm 1 on the library's key sample ``index [B, H, L, U]``: M on the sample, the kept
    queries (top-u, or the causal rank rule) get softmax, the others the (running) mean of real values."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    index = np.asarray(index)
    lq, lk = q.shape[1], k.shape[1]
    samples, top = probsparse.sample_sizes(factor, lq, lk)
    out = np.zeros_like(q)
    real = np.asarray(mask, bool)
    for b in range(B):
        for h in range(H):
            m = np.empty(lq)
            for i in range(lq):
                s = q[b, i, h] @ k[b, index[b, h, i], h].T
                m[i] = s.max() - s.sum() / (lk if quirks else samples)
            if lq == lk:
                m[~real[b]] = -np.inf
            if causal:
                kept = [sum(m[j] > m[i] or (m[j] == m[i] and j < i) for j in range(i + 1)) < top for i in range(lq)]
            else:
                kept = np.isin(np.arange(lq), np.argsort(-m, kind="stable")[:top])
            for i in range(lq):
                visible = real[b] & ((np.arange(lk) <= i) if causal else True)
                if kept[i]:
                    s = q[b, i, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
                    e = np.where(visible, np.exp(s - s[visible].max()), 0.0)
                    out[b, i, h] = e @ v[b, :, h] / e.sum()
                else:
                    total = v[b, visible, h].sum(0)
                    out[b, i, h] = total if (causal and quirks) else total / max(visible.sum(), 1)
    return out


@pytest.mark.parametrize("causal,quirks,lq", [(True, False, 24), (True, True, 24),
                                              pytest.param(False, True, 11, marks=pytest.mark.slow)])
def test_probsparse_equals_algorithm_on_the_same_sample(causal, quirks, lq):
    q, k, v = qkv(20, lq, 24)
    mask = lengths_mask([17, 24], 24)
    rng = jax.random.key(21)
    out = fast(lambda *a: probsparse.attend(*a, mask=mask, causal=causal, factor=1, rng=rng,
                                            reference_quirks=quirks))(q, k, v)
    samples, top = probsparse.sample_sizes(1, lq, 24)
    assert (samples, top) == (4, 3 if lq == 11 else 4)  # ceil(ln 24) = 4, ceil(ln 11) = 3
    index, _ = probsparse.sample_keys(rng, mask, lq, H, samples, causal=causal, shared=quirks)
    ref = probsparse_reference(q, k, v, mask, causal, 1, index, quirks)
    rows = slice(0, 17) if lq == 24 else slice(None)  # padded query rows of row 0 are not compared
    np.testing.assert_allclose(out[0, rows], ref[0, rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)
    kept = np.isclose(out, ref, atol=1e-5)  # sanity: some queries are lazy, some attend
    lazy = np.asarray(probsparse.lazy_context(jnp.swapaxes(v, 1, 2), jnp.asarray(mask), causal, quirks))
    assert 0 < np.isclose(np.swapaxes(lazy, 1, 2), out, atol=1e-6).all(-1)[1].mean() < 1 and kept.all()


@pytest.mark.parametrize("causal", [False, True])
def test_probsparse_keeping_every_query_is_softmax(causal):
    # factor 100: u = L queries kept and U = L keys sampled, so every query gets exact softmax.
    q, k, v = qkv(22, 24)
    mask = lengths_mask([17, 24], 24)
    assert probsparse.sample_sizes(100, 24, 24) == (24, 24)
    out = fast(lambda *a: probsparse.attend(*a, mask=mask, causal=causal, factor=100))(q, k, v)
    ref = softmax_reference(q, k, v, visible(24, 24, mask, causal))
    np.testing.assert_allclose(out[0, :17], ref[0, :17], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_probsparse_samples_only_visible_real_keys():
    mask = jnp.asarray(lengths_mask([10, 24], 24)).at[0, 3].set(False)
    index, valid = probsparse.sample_keys(jax.random.key(0), mask, 24, H, 200, causal=True)
    index = np.asarray(index)
    assert np.asarray(valid).all()
    assert np.all(np.take_along_axis(np.asarray(mask)[:, None, None, :], index.reshape(B, 1, 1, -1), -1))
    assert np.all(index <= np.arange(24)[None, None, :, None])
    assert set(np.unique(index[0, :, 23])) == set(range(10)) - {3}  # uniform draws cover every real key
    shared, _ = probsparse.sample_keys(jax.random.key(0), jnp.ones((B, 24), bool), 24, H, 5, shared=True)
    assert np.all(np.asarray(shared) == np.asarray(shared)[:1, :1])


def test_probsparse_module_sampling_modes():
    q, k, v = qkv(23, 24)
    module = attention.make("probsparse", factor=1)
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    apply = jax.jit(lambda seed, det: module.apply(variables, q, k, v, deterministic=det,
                                                   rngs={"random": jax.random.key(seed)}), static_argnums=1)
    np.testing.assert_array_equal(apply(1, True), apply(2, True))  # eval: the fixed eval_seed sample
    assert not np.allclose(apply(1, False), apply(2, False))  # training: a fresh sample per call
    fixed = attention.make("probsparse", factor=1, resample=False)
    np.testing.assert_allclose(jax.jit(fixed.apply)(variables, q, k, v), apply(1, True), rtol=1e-6, atol=1e-6)


def test_probsparse_refusals_and_bad_sizes():
    q, k, v = qkv(24, 8, 12)
    with pytest.raises(NotImplementedError, match="probsparse.*causal cross"):
        probsparse.attend(q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match="probsparse.*segment_ids"):
        probsparse.attend(q, q, q, segment_ids=np.zeros((B, 8), int))
    with pytest.raises(ValueError, match="probsparse.*factor"):
        probsparse.attend(q, k, v, factor=0)


# --- primer_mdha ----------------------------------------------------------------------------------------

def dconv_reference(x, kernel, offsets, real=None, segments=None):
    """float64 loop: y_t = sum_s kernel[s] x_{t + offset_s} over in-range (same-segment) real positions."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    if real is not None:
        x = np.where(np.asarray(real)[:, :, None, None], x, 0.0)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for s, off in enumerate(offsets):
                u = t + off
                if 0 <= u < x.shape[1] and (segments is None or segments[b, u] == segments[b, t]):
                    y[b, t] += kernel[s] * x[b, u]
    return y


def kernels(seed, d=D):
    return [jax.random.normal(kk, (3, H, d)) for kk in jax.random.split(jax.random.key(seed), 3)]


@pytest.mark.parametrize("causal,centered,lq,lk", [(True, False, 13, 13), (False, False, 13, 13),
                                                   (False, True, 13, 13), (True, False, 7, 13)])
def test_primer_mdha_equals_conv_then_softmax(causal, centered, lq, lk):
    q, k, v = qkv(30, lq, lk)
    kq, kk, kv = kernels(31)
    mask = lengths_mask([lk - 4, lk], lk)
    out = fast(lambda *a: primer_mdha.attend(*a, mask=mask, causal=causal, centered=centered))(q, k, v, kq, kk, kv)
    offsets = (0, -1, 1) if centered else (0, -1, -2)
    q_real = mask if lq == lk else None
    ref = softmax_reference(dconv_reference(q, kq, offsets, q_real), dconv_reference(k, kk, offsets, mask),
                            dconv_reference(v, kv, offsets, mask), visible(lq, lk, mask, causal))
    rows = slice(0, lq - 4) if lq == lk else slice(None)
    np.testing.assert_allclose(out[0, rows], ref[0, rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_primer_mdha_identity_tap_is_softmax(causal):
    q, k, v = qkv(32)
    identity = jnp.zeros((3, H, D)).at[0].set(1.0)
    mask = lengths_mask([9, 13], 13)
    out = fast(lambda *a: primer_mdha.attend(*a, mask=mask, causal=causal))(q, k, v, identity, identity, identity)
    ref = softmax_reference(q, k, v, visible(13, 13, mask, causal))
    np.testing.assert_allclose(out[0, :9], ref[0, :9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-6)


def test_primer_mdha_causal_never_reads_the_future_and_segments_stop_the_conv():
    q, k, v = qkv(33)
    ks = kernels(34)
    apply = fast(lambda q, k, v, seg=None: primer_mdha.attend(q, k, v, *ks, causal=seg is None, segment_ids=seg))
    out = apply(q, k, v)
    t = 6
    out2 = apply(*(x.at[:, t].add(3.0) for x in (q, k, v)))
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out2[:, t:], out[:, t:])
    seg = np.repeat(np.array([[1, 2], [3, 4]]), [6, 7], axis=1)
    out = apply(q, k, v, seg)
    later = (seg == seg[:, -1:])[:, :, None, None]
    out2 = apply(q + 3.0 * later, k + 3.0 * later, v + 3.0 * later, seg)
    np.testing.assert_allclose(out2[:, :6], out[:, :6], rtol=1e-6, atol=1e-6)  # centred? no: both directions
    centred = fast(lambda q, k, v: primer_mdha.attend(q, k, v, *ks, centered=True, segment_ids=seg))
    np.testing.assert_allclose(centred(q + 3.0 * later, k + 3.0 * later, v + 3.0 * later)[:, :6],
                               centred(q, k, v)[:, :6], rtol=1e-6, atol=1e-6)


def test_primer_mdha_module_init_gradients_and_refusal():
    q, k, v = qkv(35)
    module = attention.make("primer_mdha")
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    for name in ("q_dconv", "k_dconv", "v_dconv"):
        w = variables["params"][name]
        assert w.shape == (3, H, D)
        np.testing.assert_allclose(w[:, 0, 0], [0.5, 0.5 / 3, 0.5 / 3])  # Primer's initializer
    small = [x[:1, :5] for x in (q, k, v)]
    check_directional_derivative(lambda *a: primer_mdha.attend(*a[:3], *a[3:], causal=True), (*small, *kernels(36)))
    with pytest.raises(NotImplementedError, match="primer_mdha.*causal"):
        attention.make("primer_mdha", centered=True).apply(variables, q, k, v, causal=True)


# --- Informer distilling layer -------------------------------------------------------------------------

def test_distil_conv_and_pool_equal_the_reference_ops():
    x = jax.random.normal(jax.random.key(40), (B, 11, 5))
    kernel, bias = jax.random.normal(jax.random.key(41), (3, 5, 4)), jnp.arange(4.0)
    wrapped = jnp.concatenate([x[:, -1:], x, x[:, :1]], axis=1)  # circular padding 1
    ref = jax.lax.conv_general_dilated(wrapped, kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(distil.circular_conv(x, kernel, bias), ref + bias, rtol=1e-5, atol=1e-5)
    y, new_mask = distil.max_pool_halve(x)
    xn = np.pad(np.asarray(x), ((0, 0), (1, 1), (0, 0)), constant_values=-np.inf)
    ref = np.stack([xn[:, 2 * t:2 * t + 3].max(1) for t in range(6)], axis=1)  # MaxPool1d(3, 2, padding=1)
    assert new_mask is None
    np.testing.assert_array_equal(y, ref)


def test_distil_halves_length_and_mask_consistently():
    length = 11
    x = jax.random.normal(jax.random.key(42), (B, length, 6))
    lengths = np.array([7, 6])
    mask = lengths_mask(lengths, length)
    layer = distil.Distil()
    variables = fast(layer.init)(jax.random.key(0), x, mask)
    y, new_mask = fast(layer.apply)(variables, x, mask)
    assert y.shape == (B, 6, 6)
    even = jax.eval_shape(lambda x: layer.apply(variables, x, mask[:, :10]), x[:, :10])
    assert even[0].shape == (B, 5, 6) and even[1].shape == (B, 5)
    np.testing.assert_array_equal(np.asarray(new_mask).sum(1), -(-lengths // 2))
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(new_mask)], 0.0)
    # A right-padded row gives exactly the real outputs of its unpadded sequence (eval mode).
    for b, n in enumerate(lengths):
        alone, _ = fast(layer.apply)(variables, x[b:b + 1, :n])
        np.testing.assert_allclose(y[b, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_distil_padded_tokens_do_not_change_real_outputs_or_statistics(deterministic):
    x = jax.random.normal(jax.random.key(43), (B, 12, 6))
    mask = jnp.asarray(lengths_mask([7, 12], 12)).at[1, 4].set(False)  # a hole inside row 1 too
    layer = distil.Distil()
    variables = fast(layer.init)(jax.random.key(0), x, mask)
    apply = fast(lambda x: layer.apply(variables, x, mask, deterministic=deterministic, mutable=["batch_stats"]))
    (y, new_mask), stats = apply(x)
    (y2, _), stats2 = apply(x + 3.0 * ~mask[:, :, None])
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    loss = lambda p: jnp.sum(layer.apply({**variables, "params": p}, x, mask, deterministic=deterministic,  # noqa: E731
                                         mutable=["batch_stats"])[0][0] ** 2)
    grads = fast(jax.grad(loss))(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))

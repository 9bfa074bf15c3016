"""Kernel (linear) attention: the shared mechanism, linear_elu, cosformer and performer against float64
materialized references, plus padding, causality, gradient, dtype and module checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import cosformer, kernel_attention, linear_elu, performer, softmax

LINEAR = ["linear_elu", "cosformer", "performer"]


def fast(fn):
    """jax.jit without XLA's backend optimizations: they cost most of these small tests' CPU time."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def qkv(seed, b=2, lq=13, lk=13, h=2, d=8, scale=1.0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [(scale * jax.random.normal(kk, (b, n, h, d))).astype(dtype)
            for kk, n in zip(keys, (lq, lk, lk), strict=True)]


def allowed(b, lq, lk, mask=None, causal=False):
    """Boolean [b, 1, lq, lk] of visible pairs; causal aligned to the end like common.allowed_pairs."""
    ok = np.ones((b, 1, lq, lk), bool)
    if mask is not None:
        ok &= np.asarray(mask, bool)[:, None, None, :]
    if causal:
        ok &= np.arange(lq)[:, None] + (lk - lq) >= np.arange(lk)[None, :]
    return ok


def normalize(weights, v, eps=kernel_attention.EPS):
    """sum_j w_ij v_j / sum_j w_ij for float64 weights [b, h, lq, lk], 2 eps added to denominators <= eps."""
    v = np.asarray(v, np.float64)
    den = weights.sum(-1).transpose(0, 2, 1)[..., None]
    return np.einsum("bhqk,bkhd->bqhd", weights, v) / np.where(np.abs(den) <= eps, den + 2 * eps, den)


def lengths_mask(lengths, n):
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


# --- the shared mechanism -------------------------------------------------------------------------

def features(seed, b, n, h, m):
    return jnp.exp(0.5 * jax.random.normal(jax.random.key(seed), (b, n, h, m)))


@pytest.mark.parametrize("causal,lq,lk", [(False, 11, 11), (True, 11, 11), (False, 5, 11), (True, 5, 11),
                                          (True, 11, 5)])
def test_kernel_attention_equals_materialized_with_padding(causal, lq, lk):
    phi_q, phi_k = features(0, 2, lq, 3, 6), features(1, 2, lk, 3, 6)
    v = jax.random.normal(jax.random.key(2), (2, lk, 3, 4))
    mask = lengths_mask([lk - 3, lk], lk)
    out = fast(lambda *a: kernel_attention.normalized_attention(*a, mask=mask, causal=causal, chunk_size=4))(
        phi_q, phi_k, v)
    w = np.einsum("bqhm,bkhm->bhqk", np.asarray(phi_q, np.float64), np.asarray(phi_k, np.float64))
    ref = normalize(np.where(allowed(2, lq, lk, mask, causal), w, 0.0), v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_kernel_attention_chunk_size_does_not_change_the_result():
    phi_q, phi_k = features(3, 2, 13, 2, 5), features(4, 2, 13, 2, 5)
    v = jax.random.normal(jax.random.key(5), (2, 13, 2, 3))
    mask = lengths_mask([9, 13], 13)
    outs = [fast(lambda *a, c=c: kernel_attention.normalized_attention(*a, mask=mask, causal=True, chunk_size=c))(
        phi_q, phi_k, v) for c in (1, 4, 64)]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_attention_key_log_scale_is_exact_beyond_float32_range(causal):
    # True key features phi_k * exp(s) with s up to 300: exp(300) overflows float32, the result must not.
    phi_q, phi_k = features(6, 1, 10, 2, 4), features(7, 1, 10, 2, 4)
    v = jax.random.normal(jax.random.key(8), (1, 10, 2, 3))
    s = 300.0 * jax.random.uniform(jax.random.key(9), (1, 10, 2))
    out = fast(lambda *a: kernel_attention.normalized_attention(*a, causal=causal, key_log_scale=s, chunk_size=4,
                                                                eps=0.0))(phi_q, phi_k, v)
    s64 = np.asarray(s, np.float64)
    w = np.einsum("bqhm,bkhm->bhqk", np.asarray(phi_q, np.float64), np.asarray(phi_k, np.float64))
    w = w * np.exp(s64 - s64.max()).transpose(0, 2, 1)[:, :, None, :]  # a global shift cancels exactly
    ref = normalize(np.where(allowed(1, 10, 10, causal=causal), w, 0.0), v, eps=0.0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_kernel_attention_fully_padded_rows_are_zero_not_nan():
    phi = features(10, 1, 6, 1, 3)
    v = jnp.ones((1, 6, 1, 2))
    for causal in (False, True):
        out = kernel_attention.normalized_attention(phi, phi, v, mask=np.zeros((1, 6), bool), causal=causal)
        np.testing.assert_array_equal(out, 0.0)


# --- the methods against their definitions ------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_linear_elu_equals_materialized_definition(causal):
    q, k, v = qkv(11)
    mask = lengths_mask([8, 13], 13)
    out = fast(lambda *a: linear_elu.attend(*a, mask=mask, causal=causal, chunk_size=4))(q, k, v)

    def phi(x):
        x = np.asarray(x, np.float64)
        return np.where(x > 0, x + 1.0, np.exp(x))  # elu(x) + 1

    w = np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
    ref = normalize(np.where(allowed(2, 13, 13, mask, causal), w, 0.0), v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,lq,lk,max_len", [(False, 13, 13, None), (True, 13, 13, None),
                                                  (False, 7, 13, None), (True, 13, 13, 40)])
def test_cosformer_equals_materialized_definition(causal, lq, lk, max_len):
    q, k, v = qkv(12, lq=lq, lk=lk)
    mask = lengths_mask([lk - 4, lk], lk)
    out = fast(lambda *a: cosformer.attend(*a, mask=mask, causal=causal, max_len=max_len, chunk_size=4))(q, k, v)
    horizon = max(lq, lk) if max_len is None else max_len
    relu = lambda x: np.maximum(np.asarray(x, np.float64), 0.0)
    distance = np.arange(lq)[:, None] - np.arange(lk)[None, :]
    w = np.einsum("bqhd,bkhd->bhqk", relu(q), relu(k)) * np.cos(np.pi * distance / (2 * horizon))
    ref = normalize(np.where(allowed(2, lq, lk, mask, causal), w, 0.0), v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_cosformer_rejects_a_horizon_shorter_than_the_sequence():
    q, k, v = qkv(13)
    with pytest.raises(ValueError, match="cosformer: max_len"):
        cosformer.attend(q, k, v, max_len=5)


@pytest.mark.parametrize("causal,scale", [(False, 0.5), (False, 3.0), (True, 3.0)])
def test_performer_equals_materialized_favor_features(causal, scale):
    """The reference's stabilized features, written out in float64: queries shifted by their own max
    over features plus 1e-6, keys shifted by the max over the (visible, real) keys and features."""
    q, k, v = qkv(14, d=8, scale=scale)  # scale 3 gives logits up to ~40: exp overflows without shifts
    mask = lengths_mask([9, 13], 13)
    proj = performer.random_projection(jax.random.key(0), 32, 8)
    out = fast(lambda *a: performer.attend(*a, proj, mask=mask, causal=causal, chunk_size=4))(q, k, v)

    def log_phi(x):
        x = np.asarray(x, np.float64) * 8 ** -0.25
        return x @ np.asarray(proj, np.float64).T - 0.5 * (x * x).sum(-1, keepdims=True)  # [b, l, h, m]

    lq, lk = log_phi(q), log_phi(k)
    phi_q = (np.exp(lq - lq.max(-1, keepdims=True)) + 1e-6) / np.sqrt(32)
    ok = allowed(2, 13, 13, mask, causal)  # [b, 1, q, k]
    key_top = lk.max(-1).transpose(0, 2, 1)[:, :, None, :]  # [b, h, 1, k]
    shift = np.where(ok, key_top, -np.inf).max(-1, keepdims=True)  # [b, h, q, 1]: largest visible key
    w = np.einsum("bqhm,bkhm->bhqk", phi_q, np.exp(lk - lk.max(-1, keepdims=True)) / np.sqrt(32))
    w = w * np.exp(np.minimum(key_top - shift, 0.0))
    ref = normalize(np.where(ok, w, 0.0), v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_performer_gradients_match_materialized_reference():
    # The stabilizing shifts carry no gradient; the gradient must still be that of the exact features.
    q, k, v = qkv(24)
    mask = lengths_mask([9, 13], 13)
    proj = performer.random_projection(jax.random.key(1), 32, 8)

    def materialized(q, k, v, causal):
        def phi(x):
            x = x * 8 ** -0.25
            return jnp.exp(x @ proj.astype(x.dtype).T - 0.5 * jnp.sum(x * x, -1, keepdims=True))

        w = jnp.where(allowed(2, 13, 13, mask, causal), jnp.einsum("bqhm,bkhm->bhqk", phi(q), phi(k)), 0.0)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v) / jnp.sum(w, -1).transpose(0, 2, 1)[..., None]

    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    for causal in (False, True):
        ours = fast(jax.grad(loss(lambda *a, c=causal: performer.attend(*a, proj, mask=mask, causal=c,
                                                                          chunk_size=4)), argnums=(0, 1, 2)))
        with jax.enable_x64(True):
            ref = jax.grad(loss(lambda *a, c=causal: materialized(*a, c)), argnums=(0, 1, 2))(
                *(np.asarray(x, np.float64) for x in (q, k, v)))
        for g, r in zip(ours(q, k, v), ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3 * np.abs(r).max())


def test_performer_projection_blocks_are_orthogonal():
    proj = np.asarray(performer.random_projection(jax.random.key(1), 20, 8), np.float64)
    for block in (proj[:8], proj[8:16], proj[16:]):
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)


def test_performer_error_against_softmax_falls_as_features_grow():
    q, k, v = qkv(15, lq=32, lk=32, d=16, scale=0.5)
    exact = softmax.attend(q, k, v)
    errors = []
    for m in (16, 64, 256):
        module = attention.make("performer", num_features=m)
        error = jax.vmap(lambda key, m=module: jnp.mean(jnp.abs(m.apply(m.init(key, q, k, v), q, k, v) - exact)))
        errors.append(float(jnp.mean(fast(error)(jax.random.split(jax.random.key(m), 4)))))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.6 * errors[0], errors


def test_performer_redraw_uses_the_random_stream_only_in_training():
    q, k, v = qkv(16)
    module = attention.make("performer", num_features=32, redraw=True)
    params = module.init(jax.random.key(0), q, k, v)
    stored = attention.make("performer", num_features=32).apply(params, q, k, v)
    np.testing.assert_array_equal(module.apply(params, q, k, v), stored)  # deterministic=True: stored
    train = lambda key: module.apply(params, q, k, v, deterministic=False, rngs={"random": jax.random.key(key)})
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), stored)
    # Without redraw, training uses the stored projection and needs no 'random' stream.
    np.testing.assert_array_equal(
        attention.make("performer", num_features=32).apply(params, q, k, v, deterministic=False), stored)


def test_performer_projection_gets_no_gradient():
    q, k, v = qkv(17)
    module = attention.make("performer", num_features=16)
    params = module.init(jax.random.key(0), q, k, v)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, q, k, v, causal=True) ** 2))(params)
    np.testing.assert_array_equal(grads["params"]["frozen_projection"], 0.0)


# --- every linear method ------------------------------------------------------------------------------

def build(name, q, k, v, jit=True, **params):
    if name == "performer":
        params.setdefault("num_features", 32)
    module = attention.make(name, **params)
    variables = module.init(jax.random.key(0), q, k, v)
    if not jit:
        return lambda *a, **kw: module.apply(variables, *a, **kw)
    return lambda *a, **kw: fast(lambda *b: module.apply(variables, *b, **kw))(*a)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", LINEAR)
def test_padded_keys_do_not_change_real_outputs(name, causal):
    q, k, v = qkv(18)
    mask = lengths_mask([6, 13], 13)
    fn = build(name, q, k, v, chunk_size=4)
    out = fn(q, k, v, mask=mask, causal=causal)
    out2 = fn(q, k.at[0, 6:].add(3.0), v.at[0, 6:].add(3.0), mask=mask, causal=causal)
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_causal_never_reads_the_future(name):
    q, k, v = qkv(19)
    fn = build(name, q, k, v, chunk_size=4)
    out = fn(q, k, v, causal=True)
    t = 6  # inside the second chunk
    out2 = fn(q.at[:, t].add(3.0), k.at[:, t].add(3.0), v.at[:, t].add(3.0), causal=True)
    np.testing.assert_array_equal(out2[:, :t], out[:, :t])
    assert not np.allclose(out2[:, t:], out[:, t:])


@pytest.mark.parametrize("name", LINEAR)
def test_jit_gradients_are_finite(name):
    q, k, v = qkv(20)
    mask = lengths_mask([7, 13], 13)
    fn = build(name, q, k, v, jit=False, chunk_size=4)
    for causal in (False, True):
        grads = fast(jax.grad(lambda q, k, v, c=causal: jnp.sum(jnp.sin(fn(q, k, v, mask=mask, causal=c))),
                                 argnums=(0, 1, 2)))(q, k, v)
        for g in grads:
            assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("name", LINEAR)
def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32(name):
    q, k, v = qkv(21)
    fn = build(name, q, k, v)
    for causal in (False, True):
        out = fn(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=causal)
        assert out.dtype == jnp.bfloat16
        ref = fn(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), causal=causal)
        np.testing.assert_allclose(out.astype(np.float32), ref, atol=3e-2)


@pytest.mark.parametrize("name", LINEAR)
def test_make_with_defaults_runs_at_length_256(name):
    q, k, v = qkv(22, b=1, lq=256, lk=256, h=2, d=16)
    module = attention.make(name)
    variables = fast(module.init)(jax.random.key(0), q, k, v)
    mask = lengths_mask([200], 256)
    for causal in (False, True):
        out = fast(lambda *a, c=causal: module.apply(variables, *a, mask=mask, causal=c))(q, k, v)
        assert out.shape == q.shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("name", LINEAR)
def test_refusals_and_bad_shapes_name_the_method(name):
    q, k, v = qkv(23)
    fn = build(name, q, k, v)
    with pytest.raises(NotImplementedError, match=f"{name}: segment_ids are not supported"):
        fn(q, k, v, segment_ids=np.zeros((2, 13), np.int32))
    with pytest.raises(ValueError, match=f"{name}: mask must have shape"):
        fn(q, k, v, mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=f"{name}: k and v shapes differ"):
        fn(q, k, v[:, :3])
    with pytest.raises(ValueError, match=f"{name}: chunk_size"):
        attention.make(name, chunk_size=0).apply(
            attention.make(name).init(jax.random.key(0), q, k, v), q, k, v, causal=True)

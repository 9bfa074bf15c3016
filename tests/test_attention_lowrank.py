"""Linformer and Nystromformer: exactness limits against a float64 softmax reference, padding, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_softmax import naive

from effjax import attention
from effjax.attention import linformer, nystromformer

FAST = {"xla_backend_optimization_level": 0}  # compiles much faster on CPU; same semantics


def fast(fn):
    """jax.jit with fast CPU compilation: eager dispatch of many small ops is slow on CPU."""
    return jax.jit(fn, compiler_options=FAST)


def nystrom(q, k, v, **kw):
    return fast(lambda q, k, v: nystromformer.attend(q, k, v, **kw))(q, k, v)


def lin(q, k, v, *proj, **kw):
    return fast(lambda q, k, v: linformer.attend(q, k, v, *proj, **kw))(q, k, v)


def init(module, q, k, v, **kw):
    return fast(lambda key, q, k, v: module.init(key, q, k, v, **kw))(jax.random.key(0), q, k, v)


def apply(module, variables, q, k, v, **kw):
    return fast(lambda vs, q, k, v: module.apply(vs, q, k, v, **kw))(variables, q, k, v)


def qkv(seed, b=2, lq=16, lk=16, h=2, d=8, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (b, n, h, d), dtype) for kk, n in zip(keys, (lq, lk, lk), strict=True)]


# ----------------------------------------------------------------------------------------- Linformer


@pytest.mark.parametrize("lq", [16, 7])
def test_linformer_with_identity_projections_is_softmax(lq):
    q, k, v = qkv(0, lq=lq)
    eye = jnp.eye(16)
    out = lin(q, k, v, eye, eye)
    np.testing.assert_allclose(out, naive(q, k, v), rtol=2e-5, atol=2e-5)


def test_linformer_matches_a_float64_projection_reference_and_slices_longer_projections():
    q, k, v = qkv(1, lk=12)
    e, f = (jax.random.normal(jax.random.key(s), (20, 5)) for s in (2, 3))  # n = 20 >= kv_len = 12
    mask = np.arange(12)[None, :] < np.array([[9], [12]])
    out = lin(q, k, v, e, f, mask=mask)
    q64, k64, v64, e64, f64 = (np.asarray(x, np.float64) for x in (q, k, v, e, f))
    keep = mask[:, :, None, None]
    kp = np.einsum("bnhd,nk->bkhd", k64 * keep, e64[:12])
    vp = np.einsum("bnhd,nk->bkhd", v64 * keep, f64[:12])
    np.testing.assert_allclose(out, naive(q64, kp, vp), rtol=1e-4, atol=1e-4)


def test_linformer_padded_keys_do_not_change_real_outputs():
    q, k, v = qkv(4)
    e = jax.random.normal(jax.random.key(5), (16, 4))
    mask = np.arange(16)[None, :] < np.array([[10], [16]])
    out = lin(q, k, v, e, mask=mask)
    out2 = lin(q, k.at[0, 10:].add(3.0), v.at[0, 10:].set(-50.0), e, mask=mask)
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)


def test_linformer_module_params_sharing_and_refusals():
    q, k, v = qkv(6, lq=5, lk=16)  # cross attention: E, F are sized by kv_len
    module = attention.make("linformer", k=4)
    params = init(module, q, k, v)["params"]
    assert {n: p.shape for n, p in params.items()} == {"e_proj": (16, 4), "f_proj": (16, 4)}
    assert apply(module, {"params": params}, q, k, v).shape == (2, 5, 2, 8)
    shared = init(attention.make("linformer", k=4, share_kv=True), q, k, v)["params"]
    assert set(shared) == {"e_proj"}
    with pytest.raises(NotImplementedError, match="linformer: causal=True is not supported"):
        module.init(jax.random.key(0), q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match="linformer: segment_ids are not supported"):
        linformer.attend(k, k, v, jnp.eye(16), segment_ids=np.zeros((2, 16), int))
    with pytest.raises(ValueError, match=r"linformer: e_proj must have shape \[n >= kv_len = 16"):
        linformer.attend(q, k, v, jnp.eye(8))
    with pytest.raises(ValueError, match="linformer: mask must have shape"):
        linformer.attend(q, k, v, jnp.eye(16), mask=np.ones((2, 5), bool))


def test_linformer_dropout_is_deterministic_per_rng_and_off_in_eval():
    q, k, v = qkv(7)
    module = attention.make("linformer", k=8, dropout_rate=0.5)
    params = init(module, q, k, v)
    eval_out = apply(module, params, q, k, v)
    a, b = (apply(module, params, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)}) for _ in "ab")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out)


# ------------------------------------------------------------------------------------- Nystromformer


def test_iterative_pinv_converges_to_the_moore_penrose_inverse():
    logits = jax.random.normal(jax.random.key(0), (3, 8, 8))
    mat = jax.nn.softmax(logits, -1)
    ref = np.linalg.pinv(np.asarray(mat, np.float64))
    pinv = fast(lambda m: nystromformer.iterative_pinv(m, 16))
    np.testing.assert_allclose(pinv(mat), ref, rtol=1e-3, atol=1e-3)
    # Singular input: the iteration still converges to the pseudo-inverse, not a blow-up.
    sing = mat.at[:, :, -1].set(0.0)
    np.testing.assert_allclose(pinv(sing), np.linalg.pinv(np.asarray(sing, np.float64)),
                               rtol=1e-3, atol=1e-3)


def test_nystromformer_with_one_token_per_landmark_is_softmax():
    """num_landmarks = N: the Nystrom factorisation is exact, up to the pseudo-inverse iterations.

    At L=64, d=8, random normal q/k, 6 iterations (the paper's) leave an error of a few 1e-2; the
    iteration is 7th-order only once converging, so 16 iterations bring it below 1e-3.
    """
    q, k, v = qkv(8, lq=64, lk=64)
    ref = naive(q, k, v)
    exact = nystrom(q, k, v, num_landmarks=64, pinv_iterations=16)
    np.testing.assert_allclose(exact, ref, rtol=1e-3, atol=1e-3)
    paper = nystrom(q, k, v, num_landmarks=64)
    assert np.max(np.abs(paper - ref)) < 0.1
    # Fewer landmarks approximate; the error is larger but bounded.
    approx = nystrom(q, k, v, num_landmarks=8)
    assert 1e-3 < np.max(np.abs(approx - ref)) < 2.0


def test_nystromformer_padding_and_length_padding_are_exact_with_one_token_per_landmark():
    q, k, v = qkv(9, lq=13, lk=13)
    mask = np.arange(13)[None, :] < np.array([[9], [13]])
    # 13 tokens with 16 landmarks: the length is padded to 16 and the empty landmarks dropped.
    out = nystrom(q, k, v, mask=mask, num_landmarks=16, pinv_iterations=20)
    ref = naive(q, k, v, mask)
    np.testing.assert_allclose(out[0, :9], ref[0, :9], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-3, atol=1e-3)


def test_nystromformer_padded_keys_do_not_change_real_outputs():
    q, k, v = qkv(10, lq=30, lk=30)  # 30 tokens, 4 landmarks: the length is padded to 32
    mask = np.arange(30)[None, :] < np.array([[11], [30]])
    conv = jax.random.normal(jax.random.key(11), (5, 2))
    out = nystrom(q, k, v, mask=mask, num_landmarks=4, conv_kernel=conv)
    out2 = nystrom(q, k.at[0, 11:].add(3.0), v.at[0, 11:].set(-50.0), mask=mask, num_landmarks=4, conv_kernel=conv)
    np.testing.assert_allclose(out2[0, :11], out[0, :11], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2[1], out[1], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out))


def test_nystromformer_conv_skip_is_a_per_head_depthwise_conv_of_v():
    q, k, v = qkv(12, lq=10, lk=10)
    conv = jax.random.normal(jax.random.key(13), (3, 2))
    diff = nystrom(q, k, v, num_landmarks=5, conv_kernel=conv) - nystrom(
        q, k, v, num_landmarks=5)
    vp = np.pad(np.asarray(v, np.float64), ((0, 0), (1, 1), (0, 0), (0, 0)))
    ref = sum(np.asarray(conv, np.float64)[t][None, None, :, None] * vp[:, t:t + 10] for t in range(3))
    np.testing.assert_allclose(diff, ref, rtol=1e-4, atol=1e-4)


def test_nystromformer_module_params_and_refusals():
    q, k, v = qkv(14, lq=16, lk=16)
    module = attention.make("nystromformer", num_landmarks=4)
    params = init(module, q, k, v)["params"]
    assert params["conv_kernel"].shape == (33, 2)
    assert init(attention.make("nystromformer", conv_kernel_size=0), q, k, v) == {}
    with pytest.raises(NotImplementedError, match="nystromformer: causal=True is not supported"):
        module.init(jax.random.key(0), q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match="nystromformer: segment_ids are not supported"):
        nystrom(q, k, v, segment_ids=np.zeros((2, 16), int))
    qc = q[:, :8]
    with pytest.raises(NotImplementedError, match="nystromformer: the depthwise conv skip is not supported"):
        init(module, qc, k, v)
    cross = attention.make("nystromformer", num_landmarks=4, conv_kernel_size=0)
    assert apply(cross, {}, qc, k, v).shape == (2, 8, 2, 8)
    with pytest.raises(ValueError, match="nystromformer: mask must have shape"):
        nystrom(q, k, v, mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="nystromformer: conv_kernel_size must be >= 0"):
        attention.make("nystromformer", conv_kernel_size=-1).init(jax.random.key(0), q, k, v)


def test_nystromformer_cross_attention_with_one_token_per_landmark_is_softmax():
    q, k, v = qkv(15, lq=6, lk=12)
    mask = np.arange(12)[None, :] < np.array([[8], [12]])
    out = nystrom(q, k, v, mask=mask, num_landmarks=12, pinv_iterations=20)
    np.testing.assert_allclose(out, naive(q, k, v, mask), rtol=1e-3, atol=1e-3)

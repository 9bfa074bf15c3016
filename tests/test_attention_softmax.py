"""Softmax attention against a float64 numpy O(N^2) reference, plus mask, causal and dtype checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import softmax


def naive(q, k, v, mask=None, segment_ids=None, causal=False):
    """Loop-free float64 reference written from the definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        allowed &= np.asarray(mask)[:, None, None, :]
    if segment_ids is not None:
        s = np.asarray(segment_ids)
        allowed &= (s[:, :, None] == s[:, None, :])[:, None]
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def qkv(seed, b=2, lq=9, lk=9, h=3, d=8, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (b, n, h, d), dtype) for kk, n in zip(keys, (lq, lk, lk), strict=True)]


def test_registry_lists_softmax_and_rejects_unknown_names():
    assert "softmax" in attention.names()
    with pytest.raises(ValueError, match="Did you mean 'softmax'"):
        attention.make("sofmax")
    with pytest.raises(ValueError, match="no parameter.*num_features"):
        attention.make("softmax", num_features=3)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_reference_with_padding_and_segments(causal):
    q, k, v = qkv(0)
    mask = np.ones((2, 9), bool)
    mask[0, 6:] = False
    segments = np.array([[0] * 4 + [1] * 5, [0] * 9])
    out = jax.jit(lambda *a: softmax.attend(*a, mask=mask, segment_ids=segments, causal=causal))(q, k, v)
    np.testing.assert_allclose(out, naive(q, k, v, mask, segments, causal), rtol=2e-5, atol=2e-5)


def test_cross_attention_with_other_kv_length():
    q, k, v = qkv(1, lq=5, lk=11)
    mask = np.arange(11)[None, :] < np.array([[11], [7]])
    np.testing.assert_allclose(softmax.attend(q, k, v, mask=mask), naive(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_padded_keys_do_not_change_real_outputs():
    q, k, v = qkv(2)
    mask = np.arange(9)[None, :] < np.array([[5], [9]])
    out = softmax.attend(q, k, v, mask=mask)
    k2 = k.at[0, 5:].set(100.0)
    v2 = v.at[0, 5:].set(-50.0)
    np.testing.assert_allclose(softmax.attend(q, k2, v2, mask=mask), out, rtol=1e-6, atol=1e-6)


def test_causal_never_reads_the_future():
    q, k, v = qkv(3)
    out = softmax.attend(q, k, v, causal=True)
    t = 4
    k2, v2 = k.at[:, t].add(3.0), v.at[:, t].add(3.0)
    out2 = softmax.attend(q, k2, v2, causal=True)
    np.testing.assert_array_equal(out2[:, :t], out[:, :t])
    assert not np.allclose(out2[:, t:], out[:, t:])


def test_gradients_are_finite_and_match_reference_under_jit():
    q, k, v = qkv(4)
    mask = np.arange(9)[None, :] < np.array([[6], [9]])

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ours = jax.jit(jax.grad(loss(lambda *a: softmax.attend(*a, mask=mask, causal=True)), argnums=(0, 1, 2)))
    with jax.enable_x64(True):
        ref = jax.grad(loss(lambda *a: _jax_naive(*a, mask=mask)), argnums=(0, 1, 2))(
            *(np.asarray(x, np.float64) for x in (q, k, v)))
    for g, r in zip(ours(q, k, v), ref, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _jax_naive(q, k, v, mask):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    allowed = mask[:, None, None, :] & jnp.tril(jnp.ones(logits.shape[-2:], bool))
    w = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), -1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v = qkv(5)
    out = softmax.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), naive(q, k, v), atol=5e-2)


def test_vmap_over_an_extra_axis_equals_a_loop():
    q, k, v = qkv(6)
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    out = jax.vmap(softmax.attend)(*stacked)
    np.testing.assert_allclose(out[1], softmax.attend(2 * q, 2 * k, 2 * v), rtol=1e-6, atol=1e-6)


def test_module_dropout_is_deterministic_per_rng_and_off_in_eval():
    q, k, v = qkv(7)
    module = attention.make("softmax", dropout_rate=0.5)
    params = module.init(jax.random.key(0), q, k, v)
    eval_out = module.apply(params, q, k, v)
    np.testing.assert_allclose(eval_out, naive(q, k, v), rtol=2e-5, atol=2e-5)
    a = module.apply(params, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = module.apply(params, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out)


def test_shape_and_dtype_mismatches_raise_clear_errors():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        softmax.attend(q, k, v[:, :3])
    with pytest.raises(ValueError, match="dtypes differ"):
        softmax.attend(q, k, v.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        softmax.attend(q[0], k, v)
    with pytest.raises(ValueError, match="mask must have shape"):
        softmax.attend(q, k, v, mask=np.ones((2, 4), bool))


def test_pair_mask_restricts_attention_like_the_reference():
    q, k, v = qkv(9)
    band = np.abs(np.arange(9)[:, None] - np.arange(9)[None, :]) <= 2
    out = softmax.attend(q, k, v, pair_mask=band[None, None], causal=True)
    # Reference: a band and causal mask is a causal mask with keys older than 2 steps removed.
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8)
    logits = np.where(band & np.tril(np.ones((9, 9), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)

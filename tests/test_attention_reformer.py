"""Reformer LSH attention against a float64 numpy reference written from the paper's rules (Sec. 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention import reformer

B, L, H, D = 2, 64, 2, 8
FAST = {"xla_backend_optimization_level": 0}


def inputs(seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (np.asarray(jax.random.normal(kk, (B, L, H, D))) for kk in keys[:3])
    return q, k, v, keys[3]


def reference(q, v, rotations, chunk, mask, segments):
    """Loops over tokens sorted by (padding, segment, bucket, position): same bucket, key in the query's chunk
    or the one before (cyclically), real, same segment; self only when nothing else is allowed; rounds mixed by
    softmax of their logsumexps."""
    q, v, rotations = (np.asarray(x, np.float64) for x in (q, v, rotations))
    keys = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
    rounds, num_chunks = rotations.shape[1], L // chunk
    out = np.zeros((B, L, H, D))
    for b in range(B):
        for h in range(H):
            outs, lses = [], []
            for r in range(rounds):
                proj = q[b, :, h] @ rotations[:, r]
                bucket = np.argmax(np.concatenate([proj, -proj], -1), -1)
                order = np.lexsort((np.arange(L), bucket, segments[b], ~mask[b]))  # padding last, by segment
                chunk_of = np.empty(L, int)
                chunk_of[order] = np.arange(L) // chunk
                o, lse = np.zeros((L, D)), np.zeros(L)
                for i in range(L):
                    window = {chunk_of[i], (chunk_of[i] - 1) % num_chunks}
                    logits = np.full(L, -1e9)
                    for j in range(L):
                        if (bucket[i] == bucket[j] and chunk_of[j] in window and mask[b, j]
                                and segments[b, i] == segments[b, j]):
                            logits[j] = keys[b, j, h] @ q[b, i, h] / np.sqrt(D) - 1e5 * (i == j)
                    top = logits.max()
                    lse[i] = top + np.log(np.exp(logits - top).sum())
                    o[i] = np.exp(logits - lse[i]) @ v[b, :, h]
                outs.append(o)
                lses.append(lse)
            lses = np.stack(lses)
            w = np.exp(lses - lses.max(0))
            w /= w.sum(0)
            out[b, :, h] = np.einsum("rl,rld->ld", w, np.stack(outs))
    return out


def test_equals_the_paper_rules_with_padding_and_segments():
    q, k, v, key = inputs(0)
    rotations = jax.random.normal(key, (D, 2, 2))  # 2 rounds, 4 buckets
    mask = np.arange(L)[None] < np.array([[50], [L]])
    segments = np.where(np.arange(L)[None] < np.array([[30], [L]]), 1, 2)
    fn = jax.jit(lambda q, k, v: reformer.attend(q, k, v, rotations, mask=mask, segment_ids=segments,
                                                 chunk_size=16), compiler_options=FAST)
    got = np.asarray(fn(q, k, v))
    want = reference(q, v, rotations, 16, mask, segments)
    np.testing.assert_allclose(got[0, :50], want[0, :50], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=2e-5)


def test_one_bucket_and_one_chunk_is_shared_qk_softmax_without_self():
    q, k, v, _ = inputs(1)
    rotations = jnp.zeros((D, 1, 1))  # argmax of [0, -0] is always bucket 0
    got = np.asarray(reformer.attend(q, k, v, rotations, chunk_size=L))
    q64 = np.asarray(q, np.float64)
    keys = q64 / (np.linalg.norm(q64, axis=-1, keepdims=True) + 1e-6)
    logits = np.einsum("bqhd,bkhd->bhqk", q64, keys) / np.sqrt(D) - 1e9 * np.eye(L)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", weights, v), rtol=2e-5, atol=2e-5)


def test_identical_rounds_equal_one_round_and_k_is_not_read():
    q, k, v, key = inputs(2)
    one = jax.random.normal(key, (D, 1, 4))
    two = jnp.concatenate([one, one], axis=1)
    a = reformer.attend(q, k, v, one, chunk_size=8)
    np.testing.assert_allclose(reformer.attend(q, k, v, two, chunk_size=8), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reformer.attend(q, k + 1.0, v, one, chunk_size=8), a)


def test_padded_queries_cannot_move_real_tokens_between_chunks():
    q, k, v, key = inputs(5)
    rotations = jax.random.normal(key, (D, 2, 4))
    mask = np.arange(L)[None] < np.array([[40], [L]])
    a = reformer.attend(q, k, v, rotations, mask=mask, chunk_size=8)
    b = reformer.attend(q + np.float32(5.0) * ~mask[:, :, None, None], k, v, rotations, mask=mask, chunk_size=8)
    np.testing.assert_allclose(b[0, :40], a[0, :40], rtol=1e-6, atol=1e-6)


def test_module_rotations_are_frozen_and_redraw_only_while_training():
    q, k, v, _ = inputs(3)
    module = reformer.Attention(chunk_size=16, redraw=True)
    variables = module.init(jax.random.key(0), q, k, v)
    assert variables["params"]["frozen_rotations"].shape == (D, 2, 2)  # 64 / 16 = 4 buckets
    fixed = module.apply(variables, q, k, v)
    np.testing.assert_array_equal(module.apply(variables, q, k, v), fixed)
    drawn = module.apply(variables, q, k, v, deterministic=False, rngs={"random": jax.random.key(5)})
    assert not np.allclose(drawn, fixed)
    grads = jax.grad(lambda vs: jnp.sum(module.apply(vs, q, k, v) ** 2))(variables)
    assert not np.any(grads["params"]["frozen_rotations"])


def test_clear_errors():
    q, k, v, _ = inputs(4)
    rotations = jnp.ones((D, 1, 2))
    with pytest.raises(ValueError, match="reformer: sequence length 64 is not divisible by chunk_size 24"):
        reformer.attend(q, k, v, rotations, chunk_size=24)
    with pytest.raises(NotImplementedError, match="reformer: causal=True is not supported"):
        reformer.attend(q, k, v, rotations, causal=True)
    with pytest.raises(NotImplementedError, match="reformer: cross attention"):
        reformer.attend(q, k[:, :32], v[:, :32], rotations)
    with pytest.raises(ValueError, match="num_buckets must be even"):
        reformer.Attention(num_buckets=3).init(jax.random.key(0), q, k, v)

"""A decoding step or extend over a key/value cache longer than ``decoding.KV_BLOCK`` slots (``decoding.kv_attend``):
block by block with an online softmax, up to the furthest slot any query sees (then an extend's own keys). It must
equal one masked softmax over the whole cache (grouped kv heads, blocks that do not divide the slots, rows filled to
different depths) and must not read the blocks past that slot; the decoder LM decodes through it exactly as through
the one-pass step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding import build_lm, decode_logits, init, random_tokens
from test_decoding_chunked_prefill import CHUNKS, PROMPTS

import effjax
from effjax.attention import decoding, softmax


def cache_and_query(slots, heads, kv_heads, seed=0, head_dim=8, batch=3, length=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    cache = {"key": 2 * jax.random.normal(keys[1], (batch, slots, kv_heads, head_dim)),
             "value": jax.random.normal(keys[2], (batch, slots, kv_heads, head_dim))}
    return q, cache


@pytest.mark.parametrize("block", [8, 12, 40])  # divides the 40 slots; does not; one pass for any fill
@pytest.mark.parametrize("furthest", [30, 38])  # short of the last block (read by blocks); in it (one pass)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_blocks_equal_one_masked_softmax_over_the_whole_cache(block, furthest, heads, kv_heads):
    q, cache = cache_and_query(40, heads, kv_heads)
    allowed = np.zeros((3, 40), bool)
    allowed[0, :6] = True  # a short fill
    allowed[1, :furthest + 1] = True
    allowed[2, :furthest] = np.random.default_rng(0).random(furthest) < 0.4  # a ring's scattered slots
    allowed[2, 3] = True
    got = jax.jit(decoding.kv_attend, static_argnums=3)(q, cache, jnp.asarray(allowed), block)
    want = softmax.attend(q, cache["key"], cache["value"], mask=jnp.asarray(allowed))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_blocks_past_the_furthest_seen_slot_are_not_read():
    q, cache = cache_and_query(64, 4, 2)
    poisoned = {name: x.at[:, 16:].set(jnp.nan) for name, x in cache.items()}  # blocks 2.. of 8 slots
    allowed = jnp.arange(64)[None, :] < jnp.array([[5], [16], [9]])
    got = decoding.kv_attend(q, poisoned, allowed, 8)
    assert np.all(np.isfinite(got))
    want = softmax.attend(q, cache["key"][:, :16], cache["value"][:, :16], mask=allowed[:, :16])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.all(np.isfinite(decoding.kv_attend(q, poisoned, allowed.at[1, 16].set(True), 8)))


@pytest.mark.parametrize("block", [8, 12])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_an_extend_by_blocks_equals_one_masked_softmax_over_the_cache_and_the_chunk(block, heads, kv_heads):
    q, cache = cache_and_query(40, heads, kv_heads, length=5)
    _, own = cache_and_query(5, heads, kv_heads, seed=1, batch=3)
    sees_cache = np.zeros((3, 5, 40), bool)
    sees_cache[0, :, :6] = True
    sees_cache[1, :, :30] = True
    sees_cache[2, :, 3:20] = np.random.default_rng(0).random((5, 17)) < 0.5  # per query (a window)
    sees_own = np.tril(np.ones((5, 5), bool))[None] & (np.arange(5) < np.array([[5], [2], [4]]))[:, None, :]
    own = (own["key"], own["value"], jnp.asarray(sees_own))
    got = jax.jit(decoding.kv_attend, static_argnums=3)(q, cache, jnp.asarray(sees_cache), block, own)
    pair = jnp.concatenate([jnp.asarray(sees_cache), own[2]], axis=2)[:, None]
    want = softmax.attend(q, jnp.concatenate([cache["key"], own[0]], 1), jnp.concatenate([cache["value"], own[1]], 1),
                          pair_mask=pair)
    real = sees_own[:, np.arange(5), np.arange(5)]  # the padded queries' outputs are unspecified
    np.testing.assert_allclose(np.where(real[..., None, None], got, 0), np.where(real[..., None, None], want, 0),
                               rtol=1e-5, atol=1e-6)


def test_an_extend_does_not_read_the_blocks_past_the_furthest_seen_slot():
    q, cache = cache_and_query(64, 4, 2, length=3)
    poisoned = {name: x.at[:, 16:].set(jnp.nan) for name, x in cache.items()}
    sees = jnp.broadcast_to((jnp.arange(64)[None, :] < jnp.array([[5], [16], [9]]))[:, None], (3, 3, 64))
    _, own = cache_and_query(3, 4, 2, seed=1)
    got = decoding.kv_attend(q, poisoned, sees, 8, own=(own["key"], own["value"], jnp.ones((3, 3, 3), bool)))
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("method,fields", [("softmax", {}), ("sliding_window", {})])
def test_the_lm_extends_to_the_teacher_forced_logits_through_the_blocks(monkeypatch, method, fields):
    monkeypatch.setattr(decoding, "KV_BLOCK", 8)
    lm = build_lm(method, **fields)
    variables = init(lm)
    tokens = random_tokens(3, 32)
    want = lm.apply(variables, tokens)
    got = decode_logits(lm, variables, tokens, PROMPTS, CHUNKS)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("method,fields", [("softmax", {}), ("softmax", dict(num_kv_heads=2)),
                                           ("sliding_window", {})])
def test_the_lm_decodes_the_teacher_forced_logits_through_the_blocks(monkeypatch, method, fields):
    monkeypatch.setattr(decoding, "KV_BLOCK", 8)  # the 48-slot caches (sliding_window's ring has 6) go by blocks
    lm = build_lm(method, **fields)
    variables = init(lm)
    tokens = random_tokens(2, 30)
    want = lm.apply(variables, tokens)
    got = decode_logits(lm, variables, tokens, [5, 11])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_generation_by_blocks_on_eight_devices_gives_the_one_pass_tokens(monkeypatch):
    from configs.common import DEFAULT_RULES
    from effjax.train.sharding import make_mesh

    prompts = [[3, 4, 5], [9], [2, 8, 30, 31], [7, 7]]
    one_pass = build_lm("softmax", num_kv_heads=2)
    params = init(one_pass)["params"]
    want = effjax.generate(one_pass, params, prompts, max_new_tokens=12, temperature=1.0, seed=1)
    monkeypatch.setattr(decoding, "KV_BLOCK", 8)  # the 48-slot cache: 6 blocks, the first ones read by blocks
    by_blocks = build_lm("softmax", num_kv_heads=2)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    got = effjax.generate(by_blocks, params, prompts, max_new_tokens=12, temperature=1.0, seed=1, mesh=mesh,
                          rules=DEFAULT_RULES)
    np.testing.assert_array_equal(got.tokens, want.tokens)

"""Sparse softmax methods against float64 numpy references whose masks are written here from each paper.

The reference masks are built in this file with numpy (not with effjax.attention.patterns); only
BigBird's random block draw is read from the library, and its properties are checked separately.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import patterns, softmax

B, H, D = 2, 2, 8
REAL = (50, 64)  # real tokens per row at L=64 (row 0 padded); scaled for other lengths

# name -> (params for attend/make, sequence length used in tests, causal supported)
CASES = {
    "sliding_window": (dict(window=8), 64, True),
    "longformer": (dict(window=4, num_global=2), 64, True),
    "bigbird": (dict(block_size=16, num_random_blocks=2, seed=3), 128, False),
    "block_local": (dict(block_size=16), 64, True),
    "packed": ({}, 64, True),
}
CAUSAL = [n for n, c in CASES.items() if c[2]]


def module(name):
    return importlib.import_module(f"effjax.attention.{name}")


def qkv(seed, length, lk=None, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(B, length, H, D), (B, lk or length, H, D), (B, lk or length, H, D)]
    return [jax.random.normal(kk, s, dtype) for kk, s in zip(keys, shapes, strict=True)]


def padding(length):
    real = np.array([length * 50 // 64, length])
    return np.arange(length)[None, :] < real[:, None]


def segments(length):
    """Row 0: three packed sequences then padding (id 0); row 1: two sequences."""
    s = np.zeros((B, length), np.int32)
    a, b, c = length * 20 // 64, length * 37 // 64, length * 50 // 64
    s[0, :a], s[0, a:b], s[0, b:c] = 1, 2, 3
    s[1, : length // 2], s[1, length // 2:] = 5, 7
    return s


def bigbird_reference(length, block, num_random, seed):
    """[H, L, L]: window/global blocks written from the paper; random blocks from the library's draw."""
    n = length // block
    rand = patterns.random_blocks(n, num_random, H, seed)
    out = np.zeros((H, length, length), bool)
    for h in range(H):
        for i in range(length):
            for j in range(length):
                bi, bj = i // block, j // block
                out[h, i, j] = abs(bi - bj) <= 1 or bi in (0, n - 1) or bj in (0, n - 1) or rand[h, bi, bj]
    return out


def reference_pattern(name, params, length, seg=None):
    """Allowed pairs broadcastable to [B, H, L, L], built from each method's definition."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    if name == "sliding_window":
        return np.abs(i - j) <= params["window"]
    if name == "longformer":
        g = np.arange(length) < params["num_global"]
        return (np.abs(i - j) <= params["window"]) | g[:, None] | g[None, :]
    if name == "block_local":
        return i // params["block_size"] == j // params["block_size"]
    if name == "bigbird":
        return bigbird_reference(length, params["block_size"], params["num_random_blocks"], params["seed"])
    if name == "packed":
        return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]
    raise AssertionError(name)


def naive(q, k, v, allowed, mask=None, causal=False):
    """float64 masked O(N^2) softmax; rows with no allowed key give NaN (never compared)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.broadcast_to(allowed, logits.shape).copy()
    if mask is not None:
        allowed &= np.asarray(mask)[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool), logits.shape[-1] - logits.shape[-2])
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def call(name, q, k, v, *, causal=False, **extra):
    params, length, _ = CASES[name]
    kwargs = dict(params, **extra)
    if name == "packed":
        kwargs.setdefault("segment_ids", segments(length))
    kwargs.setdefault("mask", padding(length))
    return module(name).attend(q, k, v, causal=causal, **kwargs)


@pytest.mark.parametrize(("name", "causal"), [(n, False) for n in CASES] + [(n, True) for n in CAUSAL])
def test_matches_naive_reference_with_padding(name, causal):
    params, length, _ = CASES[name]
    q, k, v = qkv(0, length)
    mask, seg = padding(length), segments(length)
    out = jax.jit(lambda q, k, v: call(name, q, k, v, causal=causal))(q, k, v)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    ref = naive(q, k, v, reference_pattern(name, params, length, seg), mask, causal)
    real = mask & (seg != 0) if name == "packed" else mask
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=2e-5, atol=2e-5)
    if name == "packed":  # ByteTransformer restores padding as zeros
        np.testing.assert_array_equal(np.asarray(out)[~real], 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_padded_keys_do_not_change_real_outputs(name):
    _, length, _ = CASES[name]
    q, k, v = qkv(1, length)
    mask = padding(length)
    out = call(name, q, k, v)
    pad = ~mask[:, :, None, None]
    out2 = call(name, q, jnp.where(pad, k + 3.0, k), jnp.where(pad, v + 3.0, v))
    np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_never_reads_the_future(name):
    _, length, _ = CASES[name]
    q, k, v = qkv(2, length)
    t = 21
    out = call(name, q, k, v, causal=True, mask=None)
    out2 = call(name, q.at[:, t].add(3.0), k.at[:, t].add(3.0), v.at[:, t].add(3.0), causal=True, mask=None)
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out2[:, t], out[:, t])


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_are_finite_under_jit(name):
    _, length, causal_ok = CASES[name]
    q, k, v = qkv(3, length)
    loss = lambda q, k, v: jnp.sum(jnp.sin(call(name, q, k, v, causal=causal_ok)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_inputs_give_bfloat16_outputs_close_to_reference(name):
    params, length, _ = CASES[name]
    q, k, v = qkv(4, length)
    mask, seg = padding(length), segments(length)
    out = call(name, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref = naive(q, k, v, reference_pattern(name, params, length, seg), mask)
    real = mask & (seg != 0) if name == "packed" else mask
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], ref[real], atol=6e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_make_with_no_params_runs_at_256_and_equals_attend(name):
    q, k, v = qkv(5, 256)
    mask = padding(256)
    mod = attention.make(name)
    variables = mod.init(jax.random.key(0), q, k, v, mask=mask)
    assert not jax.tree.leaves(variables)  # param-free: the trainer keeps only "params"
    out = jax.jit(lambda q, k, v: mod.apply(variables, q, k, v, mask=mask))(q, k, v)
    assert out.shape == q.shape and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, module(name).attend(q, k, v, mask=mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_module_takes_params_and_dropout(name):
    params, length, _ = CASES[name]
    q, k, v = qkv(6, length)
    mod = attention.make(name, dropout_rate=0.5, **params)
    variables = mod.init(jax.random.key(0), q, k, v)
    eval_out = mod.apply(variables, q, k, v)
    np.testing.assert_allclose(eval_out, module(name).attend(q, k, v, **params), rtol=1e-6, atol=1e-6)
    rngs = {"dropout": jax.random.key(1)}
    a = mod.apply(variables, q, k, v, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(a, mod.apply(variables, q, k, v, deterministic=False, rngs=rngs))
    assert not np.allclose(a, eval_out)


def test_default_block_local_at_256_is_block_diagonal_64():
    q, k, v = qkv(7, 256)
    out = attention.make("block_local").apply({}, q, k, v, causal=True)
    i = np.arange(256)
    ref = naive(q, k, v, i[:, None] // 64 == i[None, :] // 64, causal=True)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_sliding_window_cross_attention_aligns_queries_to_the_end():
    q, k, v = qkv(8, 12, lk=20)
    mask = np.arange(20)[None, :] < np.array([[17], [20]])
    out = module("sliding_window").attend(q, k, v, mask=mask, window=3, causal=True)
    i, j = np.arange(12)[:, None] + 8, np.arange(20)[None, :]
    np.testing.assert_allclose(out, naive(q, k, v, np.abs(i - j) <= 3, mask, causal=True), rtol=2e-5, atol=2e-5)


def test_sliding_window_wider_than_the_sequence_is_softmax():
    q, k, v = qkv(9, 16)
    out = module("sliding_window").attend(q, k, v, window=100, causal=True)
    np.testing.assert_allclose(out, softmax.attend(q, k, v, causal=True), rtol=1e-6, atol=1e-6)


def test_longformer_global_mask_adds_data_dependent_global_tokens():
    q, k, v = qkv(10, 32)
    g = np.zeros((B, 32), bool)
    g[0, [5, 17]] = True
    g[1, 30] = True
    out = module("longformer").attend(q, k, v, window=2, num_global=1, global_mask=g)
    i, j = np.arange(32)[:, None], np.arange(32)[None, :]
    g_all = g | (np.arange(32) < 1)
    allowed = (np.abs(i - j) <= 2)[None] | g_all[:, :, None] | g_all[:, None, :]
    np.testing.assert_allclose(out, naive(q, k, v, allowed[:, None]), rtol=2e-5, atol=2e-5)


def test_bigbird_random_layout_is_fixed_by_seed_and_outside_window_and_globals():
    n, r = 10, 3
    a = patterns.random_blocks(n, r, 4, seed=0)
    np.testing.assert_array_equal(a, patterns.random_blocks(n, r, 4, seed=0))
    assert not np.array_equal(a, patterns.random_blocks(n, r, 4, seed=1))
    assert not np.array_equal(a[0], a[1])  # drawn per head, as in the reference code
    for bi in range(n):
        for bj in range(n):
            if bi in (0, n - 1) or bj in (0, n - 1) or abs(bi - bj) <= 1:
                assert not a[:, bi, bj].any()
    assert (a[:, 1:-1].sum(-1) == r).all()
    # Fewer candidates than requested: all are taken (query block 1 of 6 has only blocks 3 and 4).
    few = patterns.random_blocks(6, 5, 1, seed=0)
    np.testing.assert_array_equal(np.flatnonzero(few[0, 1]), [3, 4])
    # The seed changes the output of attend.
    q, k, v = qkv(11, 128)
    bb = module("bigbird").attend
    assert not np.allclose(bb(q, k, v, block_size=16, num_random_blocks=2, seed=0),
                           bb(q, k, v, block_size=16, num_random_blocks=2, seed=1))


def test_packed_segments_do_not_see_each_other_and_no_segments_is_softmax():
    q, k, v = qkv(12, 64)
    seg, mask = segments(64), padding(64)
    out = module("packed").attend(q, k, v, segment_ids=seg)
    # Changing sequence 2 of row 0 (positions 20:37) leaves sequences 1 and 3 unchanged.
    k2, v2 = k.at[0, 20:37].add(3.0), v.at[0, 20:37].add(3.0)
    out2 = module("packed").attend(q, k2, v2, segment_ids=seg)
    np.testing.assert_array_equal(out2[0, :20], out[0, :20])
    np.testing.assert_array_equal(out2[0, 37:], out[0, 37:])
    assert not np.allclose(out2[0, 20:37], out[0, 20:37])
    # A padding mask that also drops the tail of sequence 3 (45:50) is honoured beside the segments.
    mask2 = mask.copy()
    mask2[0, 45:50] = False
    out3 = module("packed").attend(q, k, v, segment_ids=seg, mask=mask2)
    real = mask2 & (seg != 0)
    ref = naive(q, k, v, reference_pattern("packed", {}, 64, seg), mask2)
    np.testing.assert_allclose(np.asarray(out3)[real], ref[real], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out3)[~real], 0.0)
    np.testing.assert_allclose(module("packed").attend(q, k, v, mask=mask, causal=True),
                               softmax.attend(q, k, v, mask=mask, causal=True), rtol=1e-6, atol=1e-6)


def test_limitations_raise_with_the_method_name():
    q, k, v = qkv(13, 64)
    qc, kc, vc = qkv(13, 32, lk=64)
    with pytest.raises(NotImplementedError, match="bigbird: causal"):
        module("bigbird").attend(q, k, v, block_size=16, causal=True)
    with pytest.raises(NotImplementedError, match="bigbird: causal"):
        attention.make("bigbird", block_size=16).apply({}, q, k, v, causal=True)
    for name in ("bigbird", "longformer", "block_local"):
        with pytest.raises(NotImplementedError, match=f"{name}: cross attention"):
            module(name).attend(qc, kc, vc)
    with pytest.raises(NotImplementedError, match="packed: cross attention with segment_ids"):
        module("packed").attend(qc, kc, vc, segment_ids=np.ones((B, 32), np.int32))
    module("packed").attend(qc, kc, vc)  # without segments it is softmax, which allows cross attention
    for name in ("bigbird", "block_local"):
        with pytest.raises(ValueError, match=f"{name}: sequence length 64 is not divisible by block_size 24"):
            module(name).attend(q, k, v, block_size=24)
        # A block at least as long as the sequence is clamped to one block: full attention.
        np.testing.assert_allclose(module(name).attend(q, k, v, block_size=128), softmax.attend(q, k, v),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sliding_window: window must be >= 0"):
        module("sliding_window").attend(q, k, v, window=-1)
    with pytest.raises(ValueError, match="longformer: global_mask must have shape"):
        module("longformer").attend(q, k, v, global_mask=np.ones((B, 3), bool))

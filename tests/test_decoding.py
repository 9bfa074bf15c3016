"""Decoding from the decoder LM: prefill + steps against the teacher-forced forward pass, ``effjax.generate``
against repeated full forward passes, the samplers, sharding, cache sizes and the one-line errors.

Each method's own decoding is checked against its forward pass in ``tests/test_attention_conformance.py``; here
the whole model (embeddings, positions, every layer's cache, the head) and the generation loop are.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiered

import effjax
import effjax.models as models
from configs.common import DEFAULT_RULES
from effjax.attention import decoding, supporting
from effjax.inference import sampling
from effjax.inference.generate import empty_cache, prompt_batch
from effjax.train.sharding import make_mesh

VOCAB, MAX_LENGTH = 32, 48
DECODERS = supporting("decode")
# The methods whose whole-model checks run in the default tier; every other decoding method runs in the slow tier.
LOGITS_TIER = ("softmax",)  # the LM tests below also decode sliding_window (GQA) and retnet (8 devices)
GENERATE_TIER = ("softmax", "sliding_window")
# The whole-LM checks in the slow tier: one method per cache mechanism, and the methods whose cache depends on the
# model's length (each method's own decoding is checked against its forward pass in the conformance sweep).
LM_CHECKED = ("softmax", "sliding_window", "longformer", "block_local", "primer_mdha", "probsparse", "linear_elu",
              "cosformer", "mamba", "mamba2", "rwkv7", "hyena")
GENERATE_CHECKED = ("softmax", "sliding_window", "mamba2", "cosformer", "probsparse", "hyena")
SMALL = {"sliding_window": dict(window=5), "longformer": dict(window=5), "block_local": dict(block_size=8),
         # Sized for the model's longest sequence (at None they take the init length, 8 tokens, and no other).
         "hyena": dict(max_length=MAX_LENGTH), "kernelized_rpe": dict(max_length=MAX_LENGTH),
         # cosFormer's M is the padded length unless max_len fixes it; the references below pad each prompt
         # differently (and decoding fixes M to the cache's length otherwise).
         "cosformer": dict(max_len=MAX_LENGTH)}



def small_params(method):
    fields = set(effjax.attention.defaults(method))
    params = {k: v for k, v in SMALL.get(method, {}).items() if k in fields}
    if "chunk_size" in fields:
        params["chunk_size"] = 8  # < the prompt: the prefill's state crosses chunks
    return params


def build_lm(attention="softmax", *, position="learned", dtype=jnp.float32, num_layers=2, **fields):
    params = {attention: small_params(attention)} if isinstance(attention, str) else {
        m: small_params(m) for m in set(attention)}
    return models.build("decoder_lm", vocab_size=VOCAB, num_classes=None, max_length=MAX_LENGTH,
                        num_layers=num_layers, embed_dim=32, num_heads=4, mlp_dim=64, attention=attention,
                        attention_params=params, position=position, dropout_rate=0.0, dtype=dtype, **fields)


def init(lm, seed=0):
    return nn.meta.unbox(lm.init(jax.random.key(seed), jnp.ones((1, 8), jnp.int32)))


def random_tokens(batch, length, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 1, VOCAB), np.int32)


def decode_logits(lm, variables, tokens, prompt_lengths, chunks=()):
    """Logits at every position of ``tokens`` from a ragged prefill (right-padded to the longest prompt), then one
    extend per entry of ``chunks`` (each row's real tokens in that chunk, right-padded to the chunk's widest row;
    ``tests/test_decoding_chunked_prefill.py``), then one step per remaining position of each row;
    ``[batch, length, vocab]`` (rows past their end repeat)."""
    batch, length = tokens.shape
    prompt = int(max(prompt_lengths))
    padded = np.where(np.arange(prompt)[None] < np.asarray(prompt_lengths)[:, None], tokens[:, :prompt], 0)
    cache = nn.meta.unbox(lm.init_cache(batch, length))
    prefill_logits, cache = jax.jit(lambda v, t, c: lm.apply(v, t, cache=c))(variables, padded, cache)
    call = jax.jit(lambda v, t, c, p: lm.apply(v, t, cache=c, positions=p))
    out = np.zeros((batch, length, VOCAB), np.float32)
    for b, n in enumerate(prompt_lengths):
        out[b, :n] = prefill_logits[b, :n]
    positions = np.asarray(prompt_lengths, np.int32)
    for real in chunks:
        real = np.asarray(real)
        width = int(real.max())
        index = np.minimum(positions[:, None] + np.arange(width)[None], length - 1)
        chunk = np.where(np.arange(width)[None] < real[:, None], np.take_along_axis(tokens, index, 1), 0)
        logits, cache = call(variables, chunk, cache, positions)
        for b in range(batch):
            out[b, positions[b]:positions[b] + real[b]] = logits[b, :real[b]]
        positions = positions + real
    while positions.min() < length:
        here = np.minimum(positions, length - 1)
        logits, cache = call(variables, tokens[np.arange(batch), here][:, None], cache, here)
        out[np.arange(batch), here] = np.where((positions < length)[:, None], logits[:, 0],
                                               out[np.arange(batch), here])
        positions = positions + 1
    return out


@pytest.mark.parametrize("method", tiered([m for m in DECODERS if m in LM_CHECKED], LOGITS_TIER))
def test_prefill_and_steps_give_the_teacher_forced_logits_at_every_position(method):
    lm = build_lm(method)
    variables = init(lm)
    tokens = random_tokens(3, 24)
    want = jax.jit(lm.apply)(variables, tokens)
    got = decode_logits(lm, variables, tokens, [5, 11, 1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("position", ["sinusoid", "rotary", pytest.param("none", marks=pytest.mark.slow)])
def test_every_position_encoding_decodes(position):
    lm = build_lm("softmax", position=position)
    variables = init(lm)
    tokens = random_tokens(2, 20, seed=2)
    want = jax.jit(lm.apply)(variables, tokens)
    got = decode_logits(lm, variables, tokens, [7, 3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.slow  # the default tier mixes softmax + sliding_window (GQA) and softmax + retnet (8 devices)
def test_a_mix_of_methods_per_layer_decodes():
    mix = ("softmax", "sliding_window", "retnet")  # a key/value cache, a ring buffer and a recurrent state
    lm = build_lm(mix, num_layers=len(mix))
    variables = init(lm)
    tokens = random_tokens(2, 20, seed=3)
    want = jax.jit(lm.apply)(variables, tokens)
    np.testing.assert_allclose(decode_logits(lm, variables, tokens, [4, 9]), want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.slow  # each method's bf16 decoding is checked in its own file (tests/test_decoding_*.py)
def test_bfloat16_decoding_stays_near_the_bfloat16_forward_pass():
    lm = build_lm("softmax", dtype=jnp.bfloat16)
    variables = init(lm)
    tokens = random_tokens(2, 20, seed=4)
    want = np.asarray(jax.jit(lm.apply)(variables, tokens))
    got = decode_logits(lm, variables, tokens, [6, 2])
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def greedy_by_full_forward(lm, variables, prompt, steps):
    """The greedy continuation of ``prompt`` by re-running the whole sequence for every new token (right-padded
    to one length, which a causal model's earlier positions never see, so the forward pass compiles once)."""
    forward = jax.jit(lm.apply)
    seq = np.zeros((1, len(prompt) + steps), np.int32)
    seq[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        seq[0, n] = 1 + int(np.argmax(forward(variables, seq)[0, n - 1, 1:]))  # 0 is padding, never emitted
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("method", tiered([m for m in DECODERS if m in GENERATE_CHECKED], GENERATE_TIER))
def test_greedy_generation_equals_repeated_full_forward_passes_with_argmax(method):
    lm = build_lm(method)
    variables = init(lm, seed=5)
    prompts = [[3, 4, 5, 6, 7], [9], [2, 8, 30]]
    got = effjax.generate(lm, variables["params"], prompts, max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        assert got.tokens[i].tolist() == greedy_by_full_forward(lm, variables, prompt, 8), (method, i)
    assert got.lengths.tolist() == [8, 8, 8] and got.prompt_lengths.tolist() == [5, 1, 3]
    assert (got.tokens > 0).all(), "0 is padding: never generated"


def test_left_and_right_padded_prompts_give_the_ragged_prompts_tokens():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    ragged = [[3, 4, 5, 6], [9, 10]]
    right = np.array([[3, 4, 5, 6], [9, 10, 0, 0]])
    left = np.array([[3, 4, 5, 6], [0, 0, 9, 10]])
    runs = [effjax.generate(lm, params, p, max_new_tokens=6, temperature=1.0, seed=3).tokens
            for p in (ragged, right, left)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_sampling_is_reproducible_per_seed_and_per_sequence():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    prompts = [[3, 4, 5], [9, 10, 11, 12]]
    draw = lambda seed, p=prompts: effjax.generate(lm, params, p, max_new_tokens=12, temperature=1.5,
                                                   seed=seed).tokens
    np.testing.assert_array_equal(draw(0), draw(0))
    assert (draw(0) != draw(1)).any()
    # A sequence's draws depend on its row and the seed, not on the other rows of the batch.
    np.testing.assert_array_equal(draw(0, prompts + [[7, 7]])[:2], draw(0))


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    prompts = [[3, 4, 5], [20]]
    greedy = effjax.generate(lm, params, prompts, max_new_tokens=8).tokens
    for filters in (dict(top_k=1), dict(top_p=1e-6)):
        got = effjax.generate(lm, params, prompts, max_new_tokens=8, temperature=2.0, seed=4, **filters).tokens
        np.testing.assert_array_equal(got, greedy)


def test_stop_tokens_end_each_sequence_on_its_own():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    prompts = [[3, 4, 5], [9, 10]]
    free = effjax.generate(lm, params, prompts, max_new_tokens=10, temperature=1.0, seed=2).tokens
    stop = int(free[0, 2])
    got = effjax.generate(lm, params, prompts, max_new_tokens=10, temperature=1.0, seed=2, stop_tokens=[stop])
    for row in range(2):
        hits = np.flatnonzero(free[row] == stop)
        n = int(hits[0]) + 1 if hits.size else 10
        assert got.lengths[row] == n
        np.testing.assert_array_equal(got.tokens[row, :n], free[row, :n])
        assert (got.tokens[row, n:] == 0).all()


def reference_filter(logits, temperature, top_k, top_p):
    """Temperature, top-k and top-p written out per row in numpy (float64)."""
    out = np.full(logits.shape, -np.inf)
    for r, row in enumerate(np.asarray(logits, np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        cumulative = np.cumsum(probs) - probs
        keep = keep[cumulative < top_p]
        out[r, keep] = row[keep]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8)])
def test_the_filters_keep_the_tokens_the_definitions_keep(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 20)) * 3)
    got = sampling.filtered_logits(jnp.asarray(logits), sampling.Sampling(0.7, top_k, top_p))
    want = reference_filter(logits, 0.7, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(np.where(np.isfinite(want), got, 0), np.where(np.isfinite(want), want, 0), rtol=1e-6)


def test_sampled_tokens_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: sampling.next_tokens(logits, k[None], sampling.Sampling(1.0, 0, 0.9)))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)


def test_decoding_on_eight_devices_with_the_cache_sharded_gives_the_unsharded_tokens():
    assert jax.device_count() == 8, "tests/conftest.py emulates 8 CPU devices"
    lm = build_lm(("softmax", "retnet"))
    params = init(lm)["params"]
    prompts = [[3, 4, 5], [9], [2, 8, 30, 31], [7, 7]]
    want = effjax.generate(lm, params, prompts, max_new_tokens=6, temperature=1.0, seed=1)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = DEFAULT_RULES
    sharded_cache = empty_cache(lm, 4, 16, mesh, rules)
    key_cache = sharded_cache["block_0"]["key"]
    assert key_cache.sharding.spec[0] == ("data", "fsdp") and key_cache.sharding.spec[2] == "tensor"
    assert key_cache.addressable_shards[0].data.shape == (1, 16, 2, 8)
    got = effjax.generate(lm, params, prompts, max_new_tokens=6, temperature=1.0, seed=1, mesh=mesh, rules=rules)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_a_key_value_cache_grows_with_the_context_and_a_window_does_not():
    def bytes_at(method, length):
        return decoding.cache_bytes(jax.eval_shape(lambda: build_lm(method, num_layers=1).init_cache(1, length)))

    assert bytes_at("softmax", 2048) == 2 * bytes_at("softmax", 1024)
    if "sliding_window" in DECODERS:
        assert bytes_at("sliding_window", 65536) == bytes_at("sliding_window", 1024)


# ---- one-line errors ------------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_cache_is_refused():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    with pytest.raises(ValueError, match="longer than the cache"):
        effjax.generate(lm, params, [[3] * 10], max_new_tokens=2, cache_length=8)
    layer = effjax.attention.make("softmax")
    cache = nn.meta.unbox(layer.init_cache(1, 4, 2, 8, jnp.float32))
    q = jnp.ones((1, 6, 2, 8))
    with pytest.raises(ValueError, match="softmax: a prompt of 6 tokens is longer than the cache"):
        layer.apply({}, q, q, q, causal=True, cache=cache)


def test_max_new_tokens_past_the_learned_positions_is_refused():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    effjax.generate(lm, params, [[3] * 40], max_new_tokens=MAX_LENGTH - 40 + 1)  # fits exactly
    with pytest.raises(ValueError, match=r"past the model's maximum length 48 .*max_new_tokens <= 9"):
        effjax.generate(lm, params, [[3] * 40], max_new_tokens=MAX_LENGTH - 40 + 2)
    rotary = build_lm("softmax", position="rotary")  # no learned table: only the cache bounds it
    effjax.generate(rotary, init(rotary)["params"], [[3] * 40], max_new_tokens=20)


@pytest.mark.parametrize("bad,match", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
])
def test_sampling_settings_outside_their_ranges_are_refused(bad, match):
    lm = build_lm("softmax")
    params = init(lm)["params"]
    with pytest.raises(ValueError, match=match):
        effjax.generate(lm, params, [[3, 4]], **{"max_new_tokens": 4, **bad})


def test_bad_prompts_and_models_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        prompt_batch([[3], []], VOCAB)
    with pytest.raises(ValueError, match="prompt 0 has token 40, outside the model's tokens 1..31"):
        prompt_batch([[3, 40]], VOCAB)
    classifier = models.build("encoder_classifier", vocab_size=VOCAB, num_classes=3, num_layers=1, embed_dim=32,
                              num_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match="cannot decode: generate needs a decoder language model"):
        effjax.generate(classifier, {}, [[3]], max_new_tokens=2)


def test_a_method_that_cannot_decode_is_named_with_the_ones_that_can():
    lm = build_lm("bigbird")
    with pytest.raises(NotImplementedError, match="bigbird: decoding is not supported: it is not causal.*softmax"):
        lm.init_cache(1, 16)


# ---- grouped-query attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_decodes_with_a_cache_of_the_kv_heads_only(kv_heads):
    lm = build_lm(("softmax", "sliding_window") if "sliding_window" in DECODERS else "softmax", num_kv_heads=kv_heads)
    variables = init(lm)
    assert variables["params"]["trunk"]["block_0"]["attention"]["key"].shape == (32, kv_heads, 8)
    tokens = random_tokens(2, 20, seed=6)
    want = jax.jit(lm.apply)(variables, tokens)
    np.testing.assert_allclose(decode_logits(lm, variables, tokens, [6, 2]), want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))
    full_heads = decoding.cache_bytes(jax.eval_shape(lambda: build_lm("softmax").init_cache(1, 64)))
    grouped = decoding.cache_bytes(jax.eval_shape(lambda: build_lm("softmax", num_kv_heads=kv_heads).init_cache(1, 64)))
    positions_bytes = 2 * 64 * 4  # each slot's position, per layer
    assert grouped - positions_bytes == (full_heads - positions_bytes) * kv_heads // 4


def test_grouped_query_attention_equals_multi_head_attention_with_the_kv_projections_repeated():
    grouped = build_lm("softmax", num_kv_heads=2)
    variables = init(grouped)
    params = jax.tree.map(lambda x: x, variables["params"])
    for block in ("block_0", "block_1"):
        layer = params["trunk"][block]["attention"]
        layer["key"], layer["value"] = (jnp.repeat(layer[n], 2, axis=1) for n in ("key", "value"))
    tokens = random_tokens(2, 16, seed=7)
    np.testing.assert_allclose(grouped.apply(variables, tokens), build_lm("softmax").apply({"params": params}, tokens),
                               rtol=1e-5, atol=1e-5)


def test_num_kv_heads_must_divide_num_heads():
    with pytest.raises(ValueError, match=r"model.num_kv_heads=3 must divide model.num_heads=4"):
        init(build_lm("softmax", num_kv_heads=3))


def test_grouped_kv_heads_reach_the_flash_kernel_repeated():
    from effjax.attention import softmax

    keys = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(keys[0], (1, 32, 4, 16))
    k, v = (jax.random.normal(key, (1, 32, 2, 16)) for key in keys[1:])
    got = softmax.attend(q, k, v, causal=True, impl="pallas")
    np.testing.assert_allclose(got, softmax.attend(q, k, v, causal=True), rtol=2e-5, atol=2e-5)


def test_a_method_sized_at_init_refuses_a_cache_of_another_length():
    lm = models.build("decoder_lm", vocab_size=VOCAB, num_classes=None, max_length=16, num_layers=1, embed_dim=32,
                      num_heads=4, mlp_dim=64, attention="hyena", dropout_rate=0.0)
    variables = lm.init(jax.random.key(0), jnp.ones((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="hyena: with max_length=None .* length 16 .* use cache_length=16"):
        lm.apply(variables, jnp.ones((1, 3), jnp.int32), cache=nn.meta.unbox(lm.init_cache(1, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hyena", "kernelized_rpe"])
def test_a_method_sized_at_init_decodes_only_a_cache_of_that_length(method):
    lm = models.build("decoder_lm", vocab_size=VOCAB, num_classes=None, max_length=16, num_layers=1, embed_dim=32,
                      num_heads=4, mlp_dim=64, attention=method, dropout_rate=0.0)
    params = lm.init(jax.random.key(0), jnp.ones((1, 16), jnp.int32))["params"]
    out = effjax.generate(lm, params, [[3, 4]], max_new_tokens=4)  # the default cache: the model's max_length
    assert out.lengths.tolist() == [4]
    with pytest.raises(ValueError, match=f"{method}: with max_length=None .* length 16 .* use cache_length=16"):
        effjax.generate(lm, params, [[3, 4]], max_new_tokens=4, cache_length=8)

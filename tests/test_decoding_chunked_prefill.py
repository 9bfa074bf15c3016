"""Chunked prefill: decoding calls that continue a cache by several tokens (``effjax.attention.decoding``, extend)
and ``effjax.generate(prefill_chunk=C)``, against the teacher-forced forward pass and the one-call prefill.

Each method's own extend is checked against its forward pass in ``tests/test_attention_conformance.py``; here the
whole model (positions, every layer's cache, grouped kv heads, a mix of methods) and the generation loop are.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_decoding import VOCAB, build_lm, decode_logits, init, random_tokens

import effjax
import effjax.models as models
from configs.common import DEFAULT_RULES
from effjax.train.sharding import make_mesh

# Ragged prompts [5, 11, 1], then chunks of [7, 0, 12] and [4, 9, 2] real tokens: one row sits a chunk out.
PROMPTS, CHUNKS = [5, 11, 1], [[7, 0, 12], [4, 9, 2]]


@pytest.mark.parametrize("attention,fields", [
    ("softmax", {}),
    ("softmax", dict(position="rotary", num_kv_heads=2)),
    ("sliding_window", dict(position="sinusoid")),  # window 5: each chunk is longer than the ring
    (("softmax", "retnet"), {}),
    ("linear_elu", {}),  # kernel-feature sums
    ("block_local", {}),  # extends run as steps
    pytest.param("longformer", {}, marks=pytest.mark.slow),
    pytest.param("primer_mdha", {}, marks=pytest.mark.slow),  # conv histories before a key/value extend
    pytest.param("mamba", {}, marks=pytest.mark.slow),
    pytest.param("hyena", {}, marks=pytest.mark.slow),
    pytest.param("performer", {}, marks=pytest.mark.slow),  # running max of the key log-scales
    pytest.param("cosformer", {}, marks=pytest.mark.slow),  # position reweighting
    pytest.param("gated_deltanet", {}, marks=pytest.mark.slow),  # short conv histories
    pytest.param("rwkv7", {}, marks=pytest.mark.slow),  # token shift
    pytest.param("mamba2", dict(position="none"), marks=pytest.mark.slow),
], ids=["softmax", "softmax-rotary-gqa", "sliding_window-sinusoid", "softmax+retnet", "linear_elu", "block_local",
        "longformer", "primer_mdha", "mamba", "hyena", "performer", "cosformer", "gated_deltanet", "rwkv7", "mamba2"])
def test_prefill_extends_and_steps_give_the_teacher_forced_logits(attention, fields):
    lm = build_lm(attention, **fields)
    variables = init(lm)
    tokens = random_tokens(3, 32)
    want = jax.jit(lm.apply)(variables, tokens)
    got = decode_logits(lm, variables, tokens, PROMPTS, CHUNKS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_longformer_chunks_holding_global_tokens_give_the_teacher_forced_logits():
    """Row 2's prompt is one token, so its first chunk holds global tokens 1-3 (a global query sees every earlier
    token; a later one sees the globals and its window)."""
    lm = models.build("decoder_lm", vocab_size=VOCAB, num_classes=None, max_length=48, num_layers=2, embed_dim=32,
                      num_heads=4, mlp_dim=64, attention="longformer", dropout_rate=0.0,
                      attention_params={"longformer": dict(window=5, num_global=4)})
    variables = init(lm)
    tokens = random_tokens(3, 32)
    want = jax.jit(lm.apply)(variables, tokens)
    got = decode_logits(lm, variables, tokens, PROMPTS, CHUNKS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("method", ["softmax", "sliding_window", "gated_deltanet"])
def test_a_chunk_of_padding_leaves_the_cache_as_it_was(method):
    lm = build_lm(method)
    variables = init(lm)
    cache = nn.meta.unbox(lm.init_cache(2, 32))
    _, cache = lm.apply(variables, random_tokens(2, 9), cache=cache)
    _, after = lm.apply(variables, np.zeros((2, 6), np.int32), cache=cache, positions=jnp.array([9, 9], jnp.int32))
    for leaf, kept in zip(jax.tree.leaves(cache), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(leaf, kept)


@pytest.mark.parametrize("method", ["softmax", "sliding_window", pytest.param("mamba2", marks=pytest.mark.slow),
                                    pytest.param("rwkv7", marks=pytest.mark.slow)])
def test_generation_with_a_chunked_prefill_gives_the_one_call_tokens(method):
    lm = build_lm(method)
    params = init(lm, seed=5)["params"]
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [9], [2, 8, 30, 4, 4, 17]]
    want = effjax.generate(lm, params, prompts, max_new_tokens=8, temperature=1.0, seed=2)
    for chunk in (3, 11, 4096):  # dividing no prompt, dividing the longest, longer than the model
        got = effjax.generate(lm, params, prompts, max_new_tokens=8, temperature=1.0, seed=2, prefill_chunk=chunk)
        np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=f"{method} chunk {chunk}")
        np.testing.assert_array_equal(got.lengths, want.lengths)
    numpy_int = effjax.generate(lm, params, prompts, max_new_tokens=8, temperature=1.0, seed=2,
                                prefill_chunk=np.int64(3))
    np.testing.assert_array_equal(numpy_int.tokens, want.tokens)


def test_a_chunked_prefill_on_eight_devices_gives_the_unsharded_tokens():
    assert jax.device_count() == 8, "tests/conftest.py emulates 8 CPU devices"
    lm = build_lm(("softmax", "retnet"))
    params = init(lm)["params"]
    prompts = [[3, 4, 5, 6, 7], [9], [2, 8, 30, 31], [7, 7, 1, 2, 3, 4, 5]]
    want = effjax.generate(lm, params, prompts, max_new_tokens=6, temperature=1.0, seed=1)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    got = effjax.generate(lm, params, prompts, max_new_tokens=6, temperature=1.0, seed=1, mesh=mesh,
                          rules=DEFAULT_RULES, prefill_chunk=3)
    np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("bad", [1, -2, True, 2.5, "4"])
def test_a_prefill_chunk_that_is_not_0_or_at_least_2_is_refused(bad):
    lm = build_lm("softmax")
    with pytest.raises(ValueError, match=r"prefill_chunk must be 0 .* or an int >= 2"):
        effjax.generate(lm, init(lm)["params"], [[3, 4]], max_new_tokens=2, prefill_chunk=bad)


def cannot_extend(monkeypatch, method):
    """Makes ``method`` declare decode without extend (every decoding method extends today; a new one may not)."""
    module = importlib.import_module(f"effjax.attention.{method}")
    monkeypatch.setattr(module, "CAPABILITIES", dataclasses.replace(module.CAPABILITIES, extend=False))


def test_a_layer_whose_method_cannot_extend_is_named_with_the_ones_that_can(monkeypatch):
    cannot_extend(monkeypatch, "mamba")
    lm = build_lm(("softmax", "mamba"))
    with pytest.raises(ValueError, match=r"but mamba cannot \(methods that can: .*softmax.*\): use prefill_chunk=0"):
        effjax.generate(lm, init(lm)["params"], [[3, 4]], max_new_tokens=2, prefill_chunk=4)


def test_a_step_of_several_tokens_is_refused_by_a_method_that_cannot_extend(monkeypatch):
    cannot_extend(monkeypatch, "mamba")
    lm = build_lm("mamba")
    variables = init(lm)
    cache = nn.meta.unbox(lm.init_cache(1, 16))
    _, cache = lm.apply(variables, random_tokens(1, 4), cache=cache)
    with pytest.raises(ValueError, match=r"mamba: a decoding step takes one token per sequence .* continuing a cache "
                                         r"by several tokens is for .*softmax"):
        lm.apply(variables, random_tokens(1, 3), cache=cache, positions=jnp.array([4], jnp.int32))

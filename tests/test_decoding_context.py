"""Continuing a generation (``effjax.generate(keep_context=True)`` then ``context=``): a conversation fed in turns
gives the tokens of generating from its whole text at once, rows that stop early included, and a context that
cannot continue this call is refused in one line."""

import jax
import numpy as np
import pytest
from test_decoding import build_lm, init

import effjax
from configs.common import DEFAULT_RULES
from effjax.train.sharding import make_mesh

FIRST = [[3, 4, 5], [9], [2, 8, 30, 31, 6, 7, 12]]
SECOND = [[11, 12], [], [5, 6, 7, 8, 9, 10, 13, 14, 15]]  # row 1 continues with its pending token alone


def stop_token(lm, params, prompts, new_tokens, **sampling):
    """``(token, n)``: a token that row 0 draws first as its n-th token, n < new_tokens, so that row 0 stops
    early while the others run on."""
    free = effjax.generate(lm, params, prompts, max_new_tokens=new_tokens, **sampling).tokens
    for n in range(2, new_tokens):
        if free[0, n - 1] not in free[0, :n - 1]:
            return int(free[0, n - 1]), n
    raise AssertionError(f"row 0 repeats one token: {free[0]}")


def whole_texts(prompts, turns):
    """Each row's prompt, then for every turn its generated tokens and the next prompt."""
    texts = [list(p) for p in prompts]
    for generated, following in turns:
        for row, text in enumerate(texts):
            text += list(generated.tokens[row, :generated.lengths[row]]) + list(following[row])
    return texts


def converse(lm, params, prompt_turns, *, new_tokens, **options):
    """The turns, each continuing the last one's context; returns every turn's Generated."""
    outs, context = [], None
    for prompts in prompt_turns:
        out = effjax.generate(lm, params, prompts, max_new_tokens=new_tokens, keep_context=True, context=context,
                              **options)
        outs.append(out)
        context = out.context
    return outs


FAST = {"softmax": {}, "sliding_window": dict(position="sinusoid"),  # a ring shorter than the conversation
        "gated_deltanet": {}}  # a recurrent state and short-conv histories
# One method per other kind of cache (each method's extend is checked in tests/test_attention_conformance.py;
# here what a stopped row may write): kernel-feature sums, a mix, a ring with globals, a ring with low-rank sums,
# a chunked selective scan, token shifts, conv histories before a key/value cache, and the stepped methods.
SLOW = {"linear_elu": {}, ("softmax", "retnet"): dict(position="rotary"), "longformer": {}, "scatterbrain": {},
        "mamba": {}, "rwkv7": {}, "primer_mdha": {}, "cosformer": {}, "probsparse": {}, "kernelized_rpe": {},
        "hyena": {}}
CASES = [pytest.param(method, fields, id=method) for method, fields in FAST.items()] + [
    pytest.param(method, fields, id=method if isinstance(method, str) else "+".join(method),
                 marks=pytest.mark.slow) for method, fields in SLOW.items()]


@pytest.mark.parametrize("method,fields", CASES)
def test_a_continued_conversation_gives_the_tokens_of_its_whole_text(method, fields):
    lm = build_lm(method, **fields)
    params = init(lm)["params"]
    sampling = dict(temperature=1.0, seed=5)  # a randomly initialised model's greedy tokens repeat
    stop, n = stop_token(lm, params, FIRST, 6, **sampling)
    first, second = converse(lm, params, [FIRST, SECOND], new_tokens=6, stop_tokens=[stop], **sampling)
    assert first.lengths[0] == n and first.lengths.max() > n, "row 0 stops early while another row runs on"
    texts = whole_texts(FIRST, [(first, SECOND)])
    want = effjax.generate(lm, params, texts, max_new_tokens=6, stop_tokens=[stop], **sampling)
    np.testing.assert_array_equal(second.tokens, want.tokens)
    np.testing.assert_array_equal(second.lengths, want.lengths)
    np.testing.assert_array_equal(second.prompt_lengths, [len(p) for p in SECOND])
    # The context counts every token of the text, the one still pending included.
    np.testing.assert_array_equal(second.context.tokens, [len(t) + n for t, n in zip(texts, want.lengths, strict=True)])


def test_three_turns_with_a_chunked_prefill_give_the_one_shot_tokens():
    lm = build_lm("softmax", position="rotary", num_kv_heads=2)
    params = init(lm)["params"]
    third = [[20], [21, 22, 23], []]
    outs = converse(lm, params, [FIRST, SECOND, third], new_tokens=4, prefill_chunk=3)
    texts = whole_texts(FIRST, [(outs[0], SECOND), (outs[1], third)])
    want = effjax.generate(lm, params, texts, max_new_tokens=4)
    np.testing.assert_array_equal(outs[2].tokens, want.tokens)


def test_a_copied_context_branches_and_a_continued_one_is_refused():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    context = effjax.generate(lm, params, FIRST, max_new_tokens=3, keep_context=True).context
    branch = context.copy()
    a = effjax.generate(lm, params, SECOND, max_new_tokens=4, context=context)
    b = effjax.generate(lm, params, SECOND, max_new_tokens=4, context=branch)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="already continued .* context.copy"):
        effjax.generate(lm, params, SECOND, max_new_tokens=4, context=context)


def test_contexts_that_do_not_fit_the_call_are_refused_in_one_line():
    lm = build_lm("softmax")
    params = init(lm)["params"]
    make = lambda: effjax.generate(lm, params, FIRST, max_new_tokens=3, keep_context=True).context
    with pytest.raises(ValueError, match="holds 3 sequences but 2 prompts"):
        effjax.generate(lm, params, SECOND[:2], max_new_tokens=2, context=make())
    with pytest.raises(ValueError, match="cache_length=40 differs from the context's"):
        effjax.generate(lm, params, SECOND, max_new_tokens=2, context=make(), cache_length=40)
    with pytest.raises(ValueError, match="does not fit this model"):
        other = build_lm("softmax", num_layers=3)
        effjax.generate(other, init(other)["params"], SECOND, max_new_tokens=2, context=make())
    with pytest.raises(ValueError, match="must be the Context of an earlier generate"):
        effjax.generate(lm, params, SECOND, max_new_tokens=2, context={"cache": None})
    with pytest.raises(ValueError, match="conversation of .* needs a cache of .* start a new conversation"):
        effjax.generate(lm, params, SECOND, max_new_tokens=60, context=make())


def test_continuing_on_eight_devices_gives_the_unsharded_tokens():
    """Three turns with a row stopping early (the held leaves selected on a sharded cache); the batch of 3 is padded
    to the mesh's 4 batch shards, and the padding row restarts every turn, so it never fills the cache."""
    assert jax.device_count() == 8, "tests/conftest.py emulates 8 CPU devices"
    lm = build_lm(("softmax", "gated_deltanet"))
    params = init(lm)["params"]
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), DEFAULT_RULES
    sampling = dict(temperature=1.0, seed=3)
    stop, _ = stop_token(lm, params, FIRST, 4, **sampling)
    turns = [FIRST, SECOND, [[7], [8, 9], []]]
    want = converse(lm, params, turns, new_tokens=4, stop_tokens=[stop], **sampling)
    got = converse(lm, params, turns, new_tokens=4, stop_tokens=[stop], mesh=mesh, rules=rules, **sampling)
    for one, sharded in zip(want, got, strict=True):
        np.testing.assert_array_equal(sharded.tokens, one.tokens)
    assert len(got[-1].context.lengths) == 4 and got[-1].context.lengths[3] <= 4, got[-1].context.lengths

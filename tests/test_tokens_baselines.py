"""The trivial baselines of tokens.md Sec. 17.1: Top-K by CLS attention (EViT-style, optionally fusing the dropped
tokens) against a naive reading, and random pruning's draws; both inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_cases import check_in_vit, jit_run, probabilities, random_case, run

from effjax.tokens import random_prune, topk
from effjax.tokens.stats import AttentionStats


def naive_topk(scores, keep, prefix):
    """Per example: the prefix positions and the ``keep - prefix`` best others, ascending."""
    best = [int(i) for i in np.argsort(-scores[prefix:], kind="stable")[:keep - prefix] + prefix]
    return list(range(prefix)) + sorted(best)


def test_topk_keeps_the_tokens_the_cls_token_attends_to_most():
    x, qkv, tokens = random_case(0, n=20)
    for prefix in (1, 2):
        out, new = jit_run("topk", x, qkv, tokens, 11, prefix)
        cls = probabilities(qkv[0], qkv[1])[:, :, 0].mean(1)
        for b in range(2):
            kept = naive_topk(cls[b], 11, prefix)
            np.testing.assert_array_equal(out[b], x[b, kept])
            np.testing.assert_array_equal(new.sizes[b], tokens.sizes[b, kept])
            want_source = np.full(20, -1)
            want_source[kept] = np.arange(11)
            np.testing.assert_array_equal(new.source[b], want_source)


def test_topk_fuse_folds_the_dropped_tokens_into_one_attention_weighted_token():
    x, qkv, tokens = random_case(1, n=20)
    out, new = jit_run("topk", x, qkv, tokens, 11, 1, fuse=True)
    cls = probabilities(qkv[0], qkv[1])[:, :, 0].mean(1)
    for b in range(2):
        kept = naive_topk(cls[b], 10, 1)
        dropped = sorted(set(range(20)) - set(kept))
        np.testing.assert_array_equal(out[b, :10], x[b, kept])
        w = cls[b, dropped]
        np.testing.assert_allclose(out[b, 10], (w[:, None] * np.asarray(x[b, dropped])).sum(0) / w.sum(), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_array_equal(np.asarray(new.source[b])[dropped], 10)
    np.testing.assert_allclose(new.sizes.sum(1), tokens.sizes.sum(1))


def test_random_pruning_is_fixed_in_evaluation_and_fresh_in_training():
    x, qkv, tokens = random_case(2, n=20)
    first, new = jit_run("random_prune", x, qkv, tokens, 8, 1)
    again, _ = jit_run("random_prune", x, qkv, tokens, 8, 1)
    np.testing.assert_array_equal(first, again)  # a fixed key per layer: evaluation is reproducible
    assert not np.array_equal(new.source[0], new.source[1])  # each example draws its own subset
    other_seed, _ = jit_run("random_prune", x, qkv, tokens, 8, 1, seed=3)
    assert not np.array_equal(first, other_seed)
    stats = AttentionStats(*qkv)
    reducer = random_prune.Reducer()
    train = jax.jit(lambda key: reducer.apply({}, x, tokens, stats, keep=8, prefix=1, deterministic=False,
                                              rngs={"dropout": key})[0])
    draws = [train(jax.random.key(seed)) for seed in (0, 1)]
    assert not np.array_equal(draws[0], draws[1])  # the dropout stream when training
    # Uniform: over many draws every non-prefix token is kept about (keep - prefix) / (n - prefix) of the time.
    keys = jax.random.split(jax.random.key(4), 400)
    one = tokens.replace(sizes=tokens.sizes[:1], source=tokens.source[:1])
    kept = jax.jit(jax.vmap(lambda key: random_prune.prune(x[:1], one, key, 8, 1)[1].source[0] >= 0))(keys)
    rate = np.asarray(kept).mean(0)
    assert rate[0] == 1.0
    np.testing.assert_allclose(rate[1:], 7 / 19, atol=0.1)


def test_gradients_are_finite():
    x, qkv, tokens = random_case(3)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    for method, params in (("topk", {}), ("topk", {"fuse": True}), ("random_prune", {})):
        loss = lambda x, method=method, params=params: jnp.sum(run(method, x, qkv, tokens, 9, 1, **params)[0]
                                                               * direction)
        grad = jax.jit(jax.grad(loss))(x)
        assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert topk.SPEC.needs == ("cls_attention",) and random_prune.SPEC.needs == ()


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_topk_inside_a_vit():
    check_in_vit("topk", needs_probabilities=True)


def test_random_pruning_inside_a_vit_also_under_performer():
    check_in_vit("random_prune", needs_probabilities=False, attention="performer", prop_attn=False)

"""DynamicViT (Rao et al. 2021): the catalog's kept counts, inference top-k by the predictor with prefix tokens
first, the training path's Gumbel straight-through decisions, the sown ratio loss, and gradients in a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_method_checks import assert_kept, assert_model, key, start, vit

from effjax.tokens import dynamicvit, recover, schedule


def test_kept_counts_at_rho_0_7_are_the_catalogs_137_96_67_plus_cls():
    counts = schedule.counts(197, 1, 12, keep=0.7, layers="3,6,9")
    assert [counts[i] for i in (3, 6, 9)] == [138, 97, 68]
    assert all(c is None for i, c in enumerate(counts) if i not in (3, 6, 9))
    plan = vit(12, method="dynamicvit", keep=0.7, layers="3,6,9").token_plan(197, 1)
    assert plan.place == "block" and plan.counts == counts


def apply(x, tokens, keep, prefix, deterministic=True, seed=0):
    reducer = dynamicvit.Reducer()
    kw = dict(keep=keep, prefix=prefix)
    variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, **kw))(key(seed))
    rngs = None if deterministic else {"dropout": key(seed + 1)}
    fn = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, **kw, deterministic=deterministic, rngs=rngs,
                                               mutable=["losses", "intermediates"]))
    return reducer, variables, fn(variables, x, tokens)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_inference_keeps_the_top_scored_tokens_in_score_order_with_prefix_first(prefix):
    x, tokens = start(3, 17, seed=prefix)
    reducer, variables, ((out, new), sown) = apply(x, tokens, 11, prefix)
    assert not sown  # no ratio loss at inference
    assert_kept(x, tokens, out, new, 11, prefix)
    logprob = np.asarray(jax.jit(dynamicvit.Predictor().apply)({"params": variables["params"]["predictor"]},
                                                               x[:, prefix:], jnp.ones((3, 17 - prefix), bool)))
    for b in range(3):
        order = np.argsort(-logprob[b, :, 0], kind="stable")[:11 - prefix] + prefix
        np.testing.assert_array_equal(out[b, prefix:], np.asarray(x)[b, order])
    assert new.mask is None
    full = recover(out, new.source)  # pruned positions come back as zeros, kept ones as themselves
    kept = np.asarray(new.source) >= 0
    np.testing.assert_array_equal(np.asarray(full)[kept], np.asarray(x)[kept])
    assert np.all(np.asarray(full)[~kept] == 0)


def test_keep_equal_to_n_is_the_identity():
    x, tokens = start(2, 9)
    _, _, ((out, new), _) = apply(x, tokens, 9, 1)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(new.source, tokens.source)


def test_training_gathers_gumbel_top_k_scaled_by_straight_through_decisions_and_sows_the_ratio_loss():
    x, tokens = start(4, 33)
    _, _, ((out, new), sown) = apply(x, tokens, 21, 1, deterministic=False)
    assert out.shape == (4, 21, 8) and new.mask.shape == (4, 21)
    x, out, source, mask = (np.asarray(a) for a in (x, out, new.source, new.mask))
    assert np.all(mask[:, 0]) and 0 < mask.mean() < 1
    np.testing.assert_array_equal(out[:, 0], x[:, 0])
    for b in range(4):
        for slot in range(1, 21):
            original = int(np.flatnonzero(source[b] == slot)[0])
            expect = x[b, original] if mask[b, slot] else np.zeros(8)  # kept as is, or zeroed and masked
            np.testing.assert_allclose(out[b, slot], expect, rtol=1e-6, atol=1e-6)
    (ratio,) = sown["losses"]["dynamicvit_ratio"]
    assert ratio.shape == () and 0 <= float(ratio) <= 1
    # A second stage never revives a token the first one masked: masked tokens rank last.
    _, _, ((_, new2), _) = apply(out, new, 9, 1, deterministic=False, seed=5)
    source2, mask2 = np.asarray(new2.source), np.asarray(new2.mask)
    for b in range(4):
        for original in range(33):
            slot1, slot2 = source[b, original], source2[b, original]
            if slot1 >= 0 and not mask[b, slot1] and slot2 >= 0:
                assert not mask2[b, slot2]


@pytest.mark.slow  # one compile of a 4-layer ViT's training gradient and inference: ~20 s CPU here
def test_jit_and_a_vit_with_dynamicvit_gets_gradients_in_its_predictors():
    tokens = dict(method="dynamicvit", keep=0.7, layers="1,2")
    grads, losses, sizes = assert_model(**tokens)
    assert any(p.startswith("tokens_1/predictor") for p in grads) and any(p.startswith("tokens_2/") for p in grads)
    assert len(jax.tree_util.tree_leaves(losses)) == 2  # one ratio term per stage
    assert sizes.shape == (2, 8)  # 17 -> 12 -> 8

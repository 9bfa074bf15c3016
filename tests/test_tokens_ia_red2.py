"""IA-RED² (Pan et al. 2021) in its fixed-capacity form: the interpreter's probabilities as described, the top-p
capacity in position order with the 0.5 threshold as a mask, hierarchical dropping, the sampled training path,
and gradients in a ViT."""

import jax
import numpy as np
import pytest
from token_method_checks import assert_kept, assert_model, key, start

from effjax.tokens import ia_red2


def run(x, tokens, keep, prefix, deterministic=True, seed=0, variables=None):
    reducer = ia_red2.Reducer(num_heads=2)
    kw = dict(keep=keep, prefix=prefix)
    if variables is None:
        variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, **kw))(key(seed))
    rngs = None if deterministic else {"dropout": key(seed + 1)}
    fn = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, **kw, deterministic=deterministic, rngs=rngs,
                                               mutable=["intermediates"]))
    return variables, fn(variables, x, tokens)


def probabilities(params, x, prefix, heads=2):
    """The interpreter as the module doc writes it, in numpy."""
    x = np.asarray(x, np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    norm = params["norm"]
    h = (x - mean) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    anchor = h[:, :1] if prefix else h.mean(1, keepdims=True)
    dense = lambda p, a: np.einsum("bnc,chd->bnhd", a, np.asarray(p["kernel"])) + np.asarray(p["bias"])  # noqa
    q, k = dense(params["query"], anchor), dense(params["key"], h[:, prefix:])
    logits = np.einsum("bqhd,bkhd->bhk", q, k) / np.sqrt(q.shape[-1])
    return (1 / (1 + np.exp(-logits))).mean(1)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_inference_keeps_the_most_probable_patches_in_order_and_masks_those_under_the_threshold(prefix):
    x, tokens = start(3, 26, seed=prefix)
    variables, ((out, new), sown) = run(x, tokens, 14, prefix)
    assert not sown
    assert_kept(x, tokens, out, new, 14, prefix)
    p = probabilities(variables["params"]["interpreter"], x, prefix)
    for b in range(3):
        top = np.sort(np.argsort(-p[b], kind="stable")[:14 - prefix]) + prefix
        np.testing.assert_array_equal(out[b, prefix:], x[b, top])
        np.testing.assert_array_equal(new.mask[b], np.concatenate([np.ones(prefix, bool), p[b, top - prefix] >= 0.5]))


def test_keep_n_keeps_every_token_in_place_and_only_masks():
    x, tokens = start(2, 17)
    variables, ((out, new), _) = run(x, tokens, 17, 1)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(new.source, tokens.source)
    p = probabilities(variables["params"]["interpreter"], x, 1)
    np.testing.assert_array_equal(new.mask[:, 1:], p >= 0.5)
    assert 0 < np.asarray(new.mask[:, 1:]).mean() < 1  # the threshold is live at init


def test_a_later_group_never_revives_a_dropped_patch_and_training_samples_with_log_probs():
    x, tokens = start(4, 33)
    _, ((out, new), _) = run(x, tokens, 25, 1)
    _, ((out2, new2), _) = run(out, new, 17, 1, seed=3)
    source, mask, source2, mask2 = (np.asarray(a) for a in (new.source, new.mask, new2.source, new2.mask))
    for b in range(4):
        for original in range(33):
            s1, s2 = source[b, original], source2[b, original]
            if s1 >= 0 and not mask[b, s1] and s2 >= 0:
                assert not mask2[b, s2]
    variables, ((out, new), sown) = run(x, tokens, 25, 1, deterministic=False)
    inter = sown["intermediates"]
    (log_prob,), (kept,) = inter["ia_red2_log_prob"], inter["ia_red2_kept_fraction"]
    assert log_prob.shape == (4,) and np.all(log_prob < 0) and np.all((kept > 0) & (kept < 1))
    masked = ~np.asarray(new.mask)
    assert masked.any() and np.all(np.asarray(out)[masked] == 0)  # sampled drops inside the capacity are zeroed
    np.testing.assert_array_equal(out[:, 0], x[:, 0])


@pytest.mark.slow  # three compiles of a 4-layer ViT (init, training gradient, inference)
def test_a_vit_with_ia_red2_trains_its_interpreters_and_runs_jitted():
    tokens = dict(method="ia_red2", keep=0.7, layers="1,2")
    grads, _, sizes = assert_model(**tokens)
    assert {p.split("/")[0] for p in grads} == {"tokens_1", "tokens_2"}
    assert sizes.shape == (2, 8)

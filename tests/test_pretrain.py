"""Self-pretraining (encoder_pretrain + tasks.pretrain): the mask, the loss, causality, determinism and the handoff
of the trunk to encoder_classifier through config.init_from (Amos et al., "Never Train from Scratch", ICLR 2024)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from effjax import models
from effjax.train import tasks, warm_start

SMALL = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, max_length=64, dropout_rate=0.0,
             attention_dropout_rate=0.0)
VOCAB = 17


def pretrain_model(**kw):
    return models.build("encoder_pretrain", vocab_size=VOCAB, num_classes=None, **{**SMALL, **kw})


def padded_tokens(seed, batch=8, length=48):
    """Random tokens 1..VOCAB-1, each row padded (0) after a random length of at least 8."""
    key_tokens, key_lengths = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(key_tokens, (batch, length), 1, VOCAB)
    lengths = jax.random.randint(key_lengths, (batch, 1), 8, length + 1)
    return jnp.where(jnp.arange(length)[None] < lengths, ids, 0)


def flat(params):
    return flax.traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params)), sep="/")


@pytest.mark.parametrize("mask_rate", [0.1, pytest.param(0.15, marks=pytest.mark.slow),
                                       pytest.param(0.5, marks=pytest.mark.slow)])
def test_training_masks_a_mask_rate_share_of_the_real_tokens_and_never_padding(mask_rate):
    model = pretrain_model(mask_rate=mask_rate)
    tokens = padded_tokens(0, batch=64, length=64)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    masked = np.asarray(out["weights"]) > 0
    real = np.asarray(tokens) != 0
    assert not (masked & ~real).any(), "padding was masked"
    n = real.sum()
    std = np.sqrt(n * mask_rate * (1 - mask_rate))
    assert abs(masked.sum() - mask_rate * n) < 4 * std, (masked.sum(), mask_rate * n, std)
    np.testing.assert_array_equal(out["targets"], tokens)  # the originals are the targets


def test_the_loss_counts_the_masked_positions_only():
    model = pretrain_model()
    tokens = padded_tokens(1)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    logits, weights = np.asarray(out["logits"], np.float64), np.asarray(out["weights"])
    assert 0 < weights.sum() < (np.asarray(tokens) != 0).sum()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(tokens)[..., None], -1)[..., 0]
    expected = -(picked * weights).sum() / weights.sum()
    loss, sums = tasks.pretrain(out, {"inputs": tokens})
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(sums["count"]) == weights.sum()
    # Any change of the logits at unmasked positions leaves the loss as it was.
    noise = jax.random.normal(jax.random.key(3), logits.shape) * (1 - weights)[..., None] * 10
    np.testing.assert_allclose(tasks.pretrain({**out, "logits": out["logits"] + noise}, {"inputs": tokens})[0],
                               loss, rtol=1e-6)
    # An eval batch's padding rows (weight 0) drop out of the sums.
    row_weights = jnp.ones(tokens.shape[0]).at[0].set(0.0)
    _, partial = tasks.pretrain(out, {"inputs": tokens, "weights": row_weights})
    assert float(partial["count"]) == weights[1:].sum()


def test_masked_tokens_do_not_leak_their_original_value():
    model = pretrain_model()
    tokens = padded_tokens(2)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens)
    masked = np.asarray(out["weights"]) > 0
    changed = jnp.where(masked, tokens % (VOCAB - 1) + 1, tokens)  # another real token at every masked position
    assert (np.asarray(changed) != np.asarray(tokens))[masked].all()
    np.testing.assert_allclose(model.apply(variables, changed)["logits"], out["logits"], atol=1e-6)
    unmasked = np.argwhere(~masked & (np.asarray(tokens) != 0))[0]
    visible = tokens.at[tuple(unmasked)].set(tokens[tuple(unmasked)] % (VOCAB - 1) + 1)
    assert not np.allclose(model.apply(variables, visible)["logits"], out["logits"], atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_causal_objective_predicts_the_next_token_without_seeing_the_future(pooling):
    model = pretrain_model(objective="causal", pooling=pooling)
    tokens = padded_tokens(3)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens)
    np.testing.assert_array_equal(out["targets"][:, :-1], tokens[:, 1:])
    np.testing.assert_array_equal(out["weights"][:, :-1], (tokens[:, :-1] != 0) & (tokens[:, 1:] != 0))
    k = 5  # every row has at least 8 real tokens
    later = tokens.at[:, k].set(tokens[:, k] % (VOCAB - 1) + 1)
    perturbed = model.apply(variables, later)["logits"]
    np.testing.assert_allclose(perturbed[:, :k], out["logits"][:, :k], atol=1e-6)
    assert not np.allclose(perturbed[:, k], out["logits"][:, k], atol=1e-6)


def test_evaluation_masks_are_fixed_and_training_masks_follow_the_dropout_key():
    model = pretrain_model()
    tokens = padded_tokens(4)
    variables = model.init(jax.random.key(0), tokens)
    first = model.apply(variables, tokens)
    again = model.apply(variables, tokens, rngs={"dropout": jax.random.key(9)})
    jax.tree.map(np.testing.assert_array_equal, first, again)
    train = [model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(s)})["weights"]
             for s in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.array_equal(train[0], train[2])


def test_bad_objective_and_mask_rate_are_refused():
    tokens = padded_tokens(5)
    with pytest.raises(ValueError, match="model.objective must be one of masked, causal"):
        pretrain_model(objective="span").init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match=r"model.mask_rate must be in \(0, 1\)"):
        pretrain_model(mask_rate=0.0).init(jax.random.key(0), tokens)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_trunk_param_of_a_pretrain_model_fits_the_classifier_and_only_the_head_is_new(pooling):
    """The default tier's twin of the end-to-end handoff below: the same merge on freshly initialised models."""
    tokens = padded_tokens(6)
    pretrained = flat(pretrain_model(pooling=pooling).init(jax.random.key(1), tokens)["params"])
    classifier = models.build("encoder_classifier", vocab_size=VOCAB, num_classes=10, pooling=pooling, **SMALL)
    params = classifier.init(jax.random.key(2), tokens)["params"]
    merged, loaded, fresh, unused = warm_start.merge_params(nn.meta.unbox(params), pretrained)
    trunk = sorted(key for key in flat(params) if key.startswith("trunk/"))
    assert loaded == trunk and ("trunk/prefix_embed" in trunk) == (pooling == "cls")
    assert fresh == ["head/bias", "head/kernel"] and unused == ["lm_head/bias", "lm_head/kernel"]
    for key, value in flat(merged).items():
        np.testing.assert_array_equal(value, pretrained[key] if key in trunk else flat(params)[key])


# The pretraining run's hand-over to the fine-tune, end to end (slow): tests/test_lra_configs.py::
# test_retrieval_pretraining_reads_each_document_as_a_row_and_hands_over_its_trunk.

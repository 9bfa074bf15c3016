"""Model families: shapes, padding invariance, causality, per-layer attention and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effjax.models as models

SMALL = dict(max_length=32, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64)


def encoder(**kw):
    return models.build("encoder_classifier", vocab_size=17, num_classes=10, **{**SMALL, **kw})


def tokens(seed, shape=(3, 20), vocab=17):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_ignores_padding_tokens(pooling):
    model = encoder(pooling=pooling)
    x = tokens(0).at[:, 12:].set(0)
    params = model.init(jax.random.key(1), x)
    logits = model.apply(params, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    # Padding is id 0; moving real tokens into the padded tail changes the input, so instead check
    # that the output does not depend on the sequence's padded length.
    np.testing.assert_allclose(model.apply(params, x[:, :12]), logits, rtol=1e-5, atol=1e-5)


def test_decoder_lm_is_causal():
    model = models.build("decoder_lm", vocab_size=257, num_classes=None, **SMALL)
    x = tokens(2, vocab=257)
    params = model.init(jax.random.key(3), x)
    logits = model.apply(params, x)
    assert logits.shape == (3, 20, 257)
    t = 7
    logits2 = model.apply(params, x.at[:, t].set((x[:, t] % 255) + 1))
    np.testing.assert_allclose(logits2[:, :t], logits[:, :t], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits2[:, t:], logits[:, t:])


def test_per_layer_attention_names():
    model = encoder(attention=("softmax", "softmax"))
    x = tokens(4)
    assert model.apply(model.init(jax.random.key(0), x), x).shape == (3, 10)
    with pytest.raises(ValueError, match="lists 3 methods but model.num_layers is 2"):
        bad = encoder(attention=("softmax",) * 3)
        bad.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="Unknown attention method 'performr'"):
        encoder(attention="performr").init(jax.random.key(0), x)


def test_sequence_longer_than_model_maximum_is_rejected():
    x = tokens(5, shape=(2, 40))
    with pytest.raises(ValueError, match="Sequence length 40 exceeds the model's maximum 32"):
        encoder().init(jax.random.key(0), x)


def test_unknown_model_name_and_field():
    with pytest.raises(ValueError, match="Unknown model 'encoder_clasifier'.*Did you mean 'encoder_classifier'"):
        models.build("encoder_clasifier", vocab_size=17, num_classes=10)
    with pytest.raises(ValueError, match="no field.*num_layer\\b"):
        models.build("encoder_classifier", vocab_size=17, num_classes=10, num_layer=2)


def test_bfloat16_activations_and_dropout_determinism():
    model = encoder(dtype="bfloat16", dropout_rate=0.3)
    x = tokens(6)
    params = model.init(jax.random.key(0), x)
    out = [model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(9)}) for _ in range(2)]
    np.testing.assert_array_equal(out[0], out[1])
    assert np.all(np.isfinite(out[0]))

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


@pytest.mark.parametrize("pooling", ["mean", pytest.param("cls", marks=pytest.mark.slow)])
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


def test_families_are_the_modules_defining_model_and_task():
    assert models.names() == ["decoder_lm", "dual_encoder", "encoder_classifier", "encoder_pretrain", "vit",
                              "vit_classifier"]
    assert [models.task_of(name) for name in models.names()] == ["lm", "classification", "classification",
                                                                 "pretrain", "classification", "classification"]


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


def test_masformer_full_attention_layers_replace_the_sparse_method():
    model = encoder(attention="block_local", attention_params={"block_local": {"block_size": 7}},
                    full_attention_layers=(1,), max_length=20)
    assert [method for method, _ in model.layer_attention()] == ["block_local", "softmax"]
    x = tokens(4, (2, 20))
    variables = model.init(jax.random.key(0), x)
    # Layer 0 is block-local (21 tokens with CLS = 3 blocks of 7), layer 1 full: a token in the last block
    # changes the CLS output only through layer 1, which a 1-layer block-local model would not allow.
    out = model.apply(variables, x)
    assert not np.allclose(model.apply(variables, x.at[:, 19].set(x[:, 19] % 16 + 1)), out)
    with pytest.raises(ValueError, match="full_attention_layers has 5"):
        encoder(full_attention_layers=(5,)).init(jax.random.key(0), x)


def test_squared_relu_and_unknown_activation():
    from effjax.models.layers import squared_relu

    np.testing.assert_allclose(squared_relu(jnp.array([-2.0, 0.5, 3.0])), [0.0, 0.25, 9.0])
    x = tokens(5)
    encoder(activation="squared_relu").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="model.activation must be one of"):
        encoder(activation="swishy").init(jax.random.key(0), x)


def test_prepbn_moves_from_layernorm_to_repbn_and_ignores_padding():
    from effjax.models import norms

    np.testing.assert_allclose([norms.prepbn_gamma(s, 10, 2) for s in (0, 2, 7, 12, 20)], [1, 1, 0.5, 0, 0])
    model = encoder(norm="prepbn", prepbn_steps=4, dropout_rate=0.0, attention_dropout_rate=0.0)
    x = tokens(6).at[:, 12:].set(0)
    variables = model.init(jax.random.key(0), x)
    state = {k: v for k, v in variables.items() if k != "params"}
    assert set(state) == {"batch_stats", "norm_progress"}

    def train_apply(variables, x):
        return model.apply(variables, x, deterministic=False, mutable=["batch_stats", "norm_progress"])

    out, new_state = train_apply(variables, x)
    assert int(new_state["norm_progress"]["trunk"]["prepbn_schedule"]["step"]) == 1
    # Batch statistics come from real tokens only: the padded tail's content does not matter.
    out_tail, state_tail = train_apply(variables, x.at[:, 12:].set(0)[:, :12])
    np.testing.assert_allclose(out_tail, out, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_tail, new_state)
    # At step 0 gamma is 1 (pure LN), so training output differs from eval (pure RepBN with fresh stats).
    assert not np.allclose(model.apply(variables, x), out)
    decoder = models.build("decoder_lm", vocab_size=257, num_classes=None, norm="prepbn", **SMALL)
    with pytest.raises(ValueError, match="prepbn' cannot be causal"):
        decoder.init(jax.random.key(0), tokens(7, vocab=257))


def test_vit_takes_pixel_tokens_or_images_and_embeds_a_patch_grid():
    vit = models.build("vit_classifier", vocab_size=257, num_classes=10, num_layers=1, embed_dim=32,
                       num_heads=4, mlp_dim=64, image_size=(16, 16), patch_size=2, attention="block_local",
                       attention_params={"block_local": {"block_size": 8}})
    pixels = jax.random.randint(jax.random.key(8), (2, 256), 1, 257)
    variables = vit.init(jax.random.key(0), pixels)
    assert variables["params"]["pos_embed"].value.shape == (64, 32)  # an 8 x 8 patch grid, no CLS
    logits = vit.apply(variables, pixels)
    images = (pixels.reshape(2, 16, 16, 1) - 1.0) / 255.0
    np.testing.assert_allclose(vit.apply(variables, images), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not make a 16x16x1 image"):
        vit.apply(variables, pixels[:, :200])
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        vit.clone(patch_size=3).init(jax.random.key(0), pixels)


@pytest.mark.slow
def test_informer_distilling_halves_the_length_between_blocks_and_ignores_padding():
    model = encoder(num_layers=3, distil=True, pooling="mean", max_length=20)
    x = tokens(11, (2, 20)).at[:, 12:].set(0)
    variables = model.init(jax.random.key(0), x)
    trunk = variables["params"]["trunk"]
    assert {"distil_0", "distil_1"} <= set(trunk) and "distil_2" not in trunk
    states = model.apply(variables, x, capture_intermediates=lambda mdl, _: mdl.name == "block_2",
                         mutable=["intermediates"])[1]["intermediates"]["trunk"]["block_2"]["__call__"][0][0]
    assert states.shape == (2, 5, 32)  # 20 -> 10 -> 5 tokens
    np.testing.assert_allclose(model.apply(variables, x[:, :12]), model.apply(variables, x), rtol=1e-5, atol=1e-5)
    cls = encoder(num_layers=2, distil=True, max_length=20)
    assert cls.apply(cls.init(jax.random.key(0), x), x).shape == (2, 10)
    decoder = models.build("decoder_lm", vocab_size=257, num_classes=None, distil=True, **SMALL)
    with pytest.raises(ValueError, match="distil halves the sequence"):
        decoder.init(jax.random.key(0), tokens(7, vocab=257))


def test_attention_impl_switches_every_layer_with_a_kernel_path_and_a_method_setting_wins():
    x = tokens(5).at[:, 15:].set(0)
    mixed = ("sliding_window", "hyena")  # hyena has no kernel path: its layer stays XLA
    params = {"sliding_window": {"window": 3}}
    xla = encoder(attention=mixed, attention_params=params, dropout_rate=0.0)
    variables = xla.init(jax.random.key(0), x)
    want = xla.apply(variables, x)
    pallas = xla.clone(attention_impl="pallas")
    assert "pallas_call" in str(jax.make_jaxpr(lambda v: pallas.apply(v, x))(variables))
    np.testing.assert_allclose(pallas.apply(variables, x), want, rtol=1e-5, atol=1e-5)
    pinned = pallas.clone(attention_params={"sliding_window": {"window": 3, "impl": "xla"}})
    assert "pallas_call" not in str(jax.make_jaxpr(lambda v: pinned.apply(v, x))(variables))
    with pytest.raises(ValueError, match=r"model.attention_impl='pallas', but no layer's method \(hyena\)"):
        encoder(attention="hyena", attention_impl="pallas").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="model.attention_impl: Unknown kernel backend"):
        encoder(attention_impl="cuda").init(jax.random.key(0), x)

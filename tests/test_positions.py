"""Position encodings (``model.position``): the sinusoid table, rotary's algebra, and that models honour them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

import effjax.models as models
from configs import common
from effjax.models import positions
from effjax.models.layers import Trunk
from effjax.train import validate

TINY = dict(max_length=16, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16)
SMALL = dict(max_length=24, num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32, dropout_rate=0.0,
             attention_dropout_rate=0.0)


def param_shapes(model, x):
    params = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def random_tokens(seed, shape=(2, 20), vocab=17):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def naive_sinusoid(length, dim):
    """Vaswani et al. Sec. 3.5 entry by entry: channel 2i is sin(pos / 10000^(2i/d)), channel 2i+1 its cos."""
    table = np.zeros((length, dim))
    for pos in range(length):
        for channel in range(dim):
            angle = pos / 10000 ** ((channel - channel % 2) / dim)
            table[pos, channel] = np.sin(angle) if channel % 2 == 0 else np.cos(angle)
    return table


@pytest.mark.parametrize("length, dim", [(50, 10), (7, 5)])
def test_sinusoid_table_matches_vaswani_formula(length, dim):
    table = positions.sinusoid_table(length, dim)
    assert table.shape == (length, dim) and table.dtype == np.float32
    np.testing.assert_allclose(table, naive_sinusoid(length, dim), atol=1e-6)


def rotated(x, position):
    """``x [head_dim]`` rotated as if at ``position`` (one batch, one token, one head)."""
    return positions.apply_rotary(x[None, None, None], jnp.array([position]))[0, 0, 0]


def test_rotary_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 16))
    score = lambda m, n: jnp.dot(rotated(q, m), rotated(k, n))  # noqa: E731
    for m, n, shift in [(3, 1, 5), (0, 9, 100), (17, 17, 1000)]:
        np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-4)
    assert abs(float(score(3, 1) - score(1, 3))) > 1e-3  # and the offset itself matters


def test_rotary_preserves_norm_and_position_zero_is_identity():
    x = jax.random.normal(jax.random.key(1), (2, 12, 3, 8))
    y = positions.apply_rotary(x)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
    assert not np.allclose(y[:, 1:], x[:, 1:])
    assert positions.apply_rotary(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rotary_equals_a_naive_complex_rotation():
    batch, length, heads, dim = 2, 9, 2, 12
    x = np.asarray(jax.random.normal(jax.random.key(2), (batch, length, heads, dim)), np.float64)
    half = dim // 2
    theta = np.array([10000.0 ** (-2 * i / dim) for i in range(half)])
    expected = np.empty_like(x)
    for m in range(length):
        z = (x[:, m, :, :half] + 1j * x[:, m, :, half:]) * np.exp(1j * m * theta)  # half-split pairs (i, i + d/2)
        expected[:, m, :, :half], expected[:, m, :, half:] = z.real, z.imag
    np.testing.assert_allclose(positions.apply_rotary(jnp.asarray(x, jnp.float32)), expected, atol=1e-5)
    per_batch = positions.apply_rotary(jnp.asarray(x, jnp.float32), jnp.broadcast_to(jnp.arange(length),
                                                                                     (batch, length)))
    np.testing.assert_allclose(per_batch, expected, atol=1e-5)


def test_rotary_refuses_an_odd_head_dim():
    with pytest.raises(ValueError, match="head dim .* must be even, got 5"):
        positions.apply_rotary(jnp.ones((1, 3, 1, 5)))


def encoder(position, pooling="mean", **kw):
    return models.build("encoder_classifier", vocab_size=17, num_classes=4, position=position, pooling=pooling,
                        **{**SMALL, **kw})


@pytest.mark.parametrize("position", ["rotary", "sinusoid", "learned"])
def test_positions_make_the_encoder_see_token_order_and_none_does_not(position):
    x = random_tokens(3)
    perm = jax.random.permutation(jax.random.key(4), x.shape[1])
    ordered = encoder(position)
    params = ordered.init(jax.random.key(5), x)
    assert not np.allclose(ordered.apply(params, x[:, perm]), ordered.apply(params, x), atol=1e-4)
    blind = encoder("none")
    params = blind.init(jax.random.key(5), x)
    np.testing.assert_allclose(blind.apply(params, x[:, perm]), blind.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["encoder_classifier", "decoder_lm"])
def test_learned_keeps_the_param_tree_and_the_others_drop_the_table(family):
    kw = dict(num_classes=3, pooling="cls") if family == "encoder_classifier" else dict(num_classes=None)
    x = jnp.ones((1, 16), jnp.int32)
    built = {p: models.build(family, vocab_size=11, position=p, **kw, **TINY) for p in positions.POSITIONS}
    learned = param_shapes(built["learned"], x)
    # The tree the model had before model.position existed (recorded from that commit).
    table = (17, 8) if family == "encoder_classifier" else (16, 8)
    assert learned["trunk/pos_embed"] == table and learned["trunk/token_embed/embedding"] == (11, 8)
    assert learned["trunk/block_0/attention/query"] == (8, 2, 4) and learned["trunk/block_0/attention/out"] == (2, 4, 8)
    assert ("trunk/prefix_embed" in learned) == (family == "encoder_classifier")
    assert len(learned) == (19 if family == "encoder_classifier" else 18)
    assert param_shapes(models.build(family, vocab_size=11, **kw, **TINY), x) == learned  # the default
    for position in ("sinusoid", "rotary", "none"):
        assert param_shapes(built[position], x) == {k: v for k, v in learned.items() if k != "trunk/pos_embed"}


@pytest.mark.slow  # the default twin: the learned param tree is unchanged (paths and shapes)
def test_learned_encoder_gives_the_outputs_recorded_before_positions_existed():
    model = models.build("encoder_classifier", vocab_size=11, num_classes=3, pooling="cls", **TINY)
    x = (jnp.arange(2 * 16).reshape(2, 16) * 7) % 10 + 1
    recorded = [[-1.418774962425232, -1.5235674381256104, 1.563558578491211],
                [-1.1743717193603516, -1.6303277015686035, 1.7150465250015259]]
    np.testing.assert_allclose(model.apply(model.init(jax.random.key(0), x), x), recorded, rtol=1e-4, atol=1e-5)


def test_rotary_decoder_lm_does_not_read_the_future():
    model = models.build("decoder_lm", vocab_size=31, num_classes=None, position="rotary", **SMALL)
    x = random_tokens(6, vocab=31)
    params = model.init(jax.random.key(7), x)
    logits = model.apply(params, x)
    t = 9
    changed = model.apply(params, x.at[:, t].set(x[:, t] % 30 + 1))
    np.testing.assert_allclose(changed[:, :t], logits[:, :t], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[:, t:], logits[:, t:], atol=1e-4)


@pytest.mark.slow  # the default twin: rotary scores depend only on the relative position
def test_rotary_packed_segments_equal_each_segment_alone():
    """Positions are the token index across the packed row; rotary scores depend on index differences only, so a
    segment starting at index 7 gives the outputs it gives alone from index 0."""
    trunk = Trunk(**SMALL, vocab_size=17, position="rotary")
    x = random_tokens(8, shape=(1, 16))
    segments = jnp.array([[1] * 7 + [2] * 9])
    params = trunk.init(jax.random.key(9), x, segment_ids=segments)
    packed, _ = trunk.apply(params, x, segment_ids=segments)
    alone, _ = trunk.apply(params, x[:, 7:])
    np.testing.assert_allclose(packed[:, 7:], alone, rtol=1e-4, atol=1e-5)
    learned = Trunk(**SMALL, vocab_size=17)  # the additive table is absolute: the same segment moved differs
    params = learned.init(jax.random.key(9), x, segment_ids=segments)
    assert not np.allclose(learned.apply(params, x, segment_ids=segments)[0][:, 7:],
                           learned.apply(params, x[:, 7:])[0], atol=1e-4)


def test_rotary_refuses_a_method_that_makes_its_keys_from_q():
    x = random_tokens(10)
    kw = dict(attention="primer_mdha", attention_params={"primer_mdha": {"share_qk": True}})
    with pytest.raises(ValueError, match="primer_mdha.*makes its keys from q itself"):
        encoder("rotary", **kw).init(jax.random.key(0), x)
    model = encoder("rotary", attention="primer_mdha")  # with its own key projection it runs
    assert model.apply(model.init(jax.random.key(0), x), x).shape == (2, 4)


def test_unknown_position_fails_with_the_valid_values():
    valid = "model.position must be one of learned, sinusoid, rotary, none, got 'alibi'"
    with pytest.raises(ValueError, match=valid):
        encoder("alibi").init(jax.random.key(0), random_tokens(0))
    config = common.get_base_config()
    assert config.model.position == "learned"
    config.model.position = "alibi"
    with pytest.raises(ValueError, match=valid):
        validate.validate(config, process_count=1, batch_shards=1)
    config.model.position = "rotary"
    validate.validate(config, process_count=1, batch_shards=1)


@pytest.mark.parametrize("family", ["encoder_classifier", "decoder_lm"])
def test_config_position_reaches_the_model_as_the_trainer_builds_it(family):
    config = common.get_base_config()
    config.model.update(name=family, position="rotary", **TINY)
    fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}  # as trainer._build_model passes them
    model = models.build(family, vocab_size=11, num_classes=3, **fields)
    assert model.position == "rotary"
    assert "trunk/pos_embed" not in param_shapes(model, jnp.ones((1, 16), jnp.int32))


def test_a_family_with_its_own_learned_table_refuses_other_positions():
    vit = models.build("vit_classifier", vocab_size=257, num_classes=3, num_layers=1, embed_dim=8, num_heads=2,
                       mlp_dim=16, image_size=(4, 4), patch_size=2, position="sinusoid")
    with pytest.raises(ValueError, match="model.position='sinusoid' is for the token models"):
        vit.init(jax.random.key(0), jnp.ones((1, 16), jnp.int32))

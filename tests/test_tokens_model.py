"""Token reduction in models and runs: the Shapes data, pooling, the trainer, the mesh, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import effjax.models as models
from configs import vit_shapes
from effjax.data import make_source
from effjax.train import steps, validate
from effjax.train.optim import param_path
from effjax.train.state import TrainState
from effjax.train.trainer import Run


def test_shapes_images_are_deterministic_balanced_pixel_tokens():
    source = make_source("shapes", "train", num_train=600)
    again = make_source("shapes", "train", num_train=600)
    first = source[3]
    np.testing.assert_array_equal(first["inputs"], again[3]["inputs"])
    assert first["inputs"].shape == (32 * 32 * 3,) and first["inputs"].min() >= 1 and first["inputs"].max() <= 256
    labels = np.bincount([int(source[i]["targets"]) for i in range(600)], minlength=6)
    assert labels.min() > 60, labels  # about 100 each
    other = make_source("shapes", "validation", num_validation=10)
    assert not np.array_equal(other[3]["inputs"], first["inputs"])
    with pytest.raises(IndexError, match="index 600 outside"):
        source[600]


def vit(**kw):
    fields = dict(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, image_size=(16, 16), channels=3, patch_size=4)
    return models.build("vit_classifier", vocab_size=1, num_classes=10, **{**fields, **kw})


@pytest.mark.slow
def test_mean_pooling_weighs_merged_tokens_by_size():
    # Merging identical patches must not move a size-weighted mean: a constant image gives equal tokens
    # before position embeddings only, so check with the positions zeroed and one block of attention.
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    flat = vit(pooling="mean", num_layers=1)
    v = jax.jit(flat.init)(jax.random.key(1), images)
    v = jax.tree_util.tree_map_with_path(lambda p, a: a * 0 if "pos_embed" in jax.tree_util.keystr(p) else a, v)
    constant = np.ones((2, 16, 16, 3), np.float32) * 0.3
    reduced = vit(pooling="mean", num_layers=1, tokens=dict(method="tome", r=6))
    np.testing.assert_allclose(jax.jit(reduced.apply)(v, constant), jax.jit(flat.apply)(v, constant), rtol=1e-5,
                               atol=1e-5)


def shapes_config(**tokens):
    c = vit_shapes.get_config("smoke")
    c.model.embed_dim = 32
    c.data.num_train, c.data.num_validation = 64, 16
    for key, value in tokens.items():
        c.model.tokens[key] = value
    return c


def run_losses(config, devices, steps=3):
    run = Run(config, devices=devices)
    state, it, losses = run.init_state(), run.train_iterator(), []
    for _ in range(steps):
        state, metrics = run.step(state, next(it))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow  # the default tier's twin: tests/test_tokens_conformance.py's eight-device check
def test_tome_fine_tunes_in_the_trainer_on_eight_devices_as_on_one():
    config = shapes_config(method="tome", r="(3,-1)")
    config.mesh.data = 8
    eight = run_losses(config, jax.devices()[:8])
    config.mesh.data = 1
    one = run_losses(config, jax.devices()[:1])
    np.testing.assert_allclose(eight, one, rtol=2e-5, atol=2e-5)
    assert all(np.isfinite(one))


@pytest.mark.parametrize("tokens,message", [
    (dict(method="tomee", r="4"), "Unknown token-reduction method 'tomee'"),
    (dict(method="tome", r=""), "needs a schedule"),
    (dict(method="tome", r="(4,-1,2)"), "ToMe's \\(r, inflection\\)"),
    (dict(method="tome", r="4", keep="0.5"), "both set"),
])
def test_the_config_check_names_bad_token_settings(tokens, message):
    with pytest.raises(ValueError, match=message):
        validate.validate(shapes_config(**tokens), process_count=1, batch_shards=1)


def test_proportional_attention_under_a_method_without_key_bias_is_refused_naming_it():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    model = vit(pooling="cls", attention="performer", tokens=dict(method="tome", r=2))
    with pytest.raises(ValueError, match="'performer' cannot take a key bias.*prop_attn=False"):
        jax.eval_shape(model.init, jax.random.key(0), images)
    with pytest.raises(ValueError, match="cannot be causal"):
        decoder = models.build("decoder_lm", vocab_size=257, num_classes=None, max_length=16, num_layers=1,
                               embed_dim=16, num_heads=2, mlp_dim=32, tokens=dict(method="tome", r=2))
        jax.eval_shape(decoder.init, jax.random.key(0), np.ones((1, 16), np.int32))


@pytest.mark.slow
def test_a_pruner_asks_no_key_bias_so_it_runs_under_any_attention():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    model = vit(pooling="cls", attention="performer", tokens=dict(method="random_prune", keep=0.5, layers="1"))
    assert not model.token_plan(17, 1).prop_attn
    assert np.all(np.isfinite(model.apply(model.init(jax.random.key(0), images), images)))


class SowsALoss(nn.Module):
    """A linear classifier that sows 0.5 * |w|^2 into the 'losses' collection when training."""

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        dense = nn.Dense(3)
        logits = dense(x)
        if not deterministic:
            self.sow("losses", "penalty", 0.5 * jnp.sum(jnp.square(dense.variables["params"]["kernel"])))
        return logits


def test_the_train_step_minimises_sown_losses_and_reports_them_apart():
    model = SowsALoss()
    x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.sgd(0.1)
    state = TrainState(step=jnp.array(0), params=params, model_state={}, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(1)))

    def loss_fn(logits, batch):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, {"accuracy": jnp.float32(0), "count": jnp.float32(4)}

    new, metrics = steps.train_step(state, {"inputs": x, "targets": y}, model=model, tx=tx, loss_fn=loss_fn,
                                    schedule=lambda step: 0.1)
    penalty = 0.5 * float(jnp.sum(jnp.square(params["Dense_0"]["kernel"])))
    assert float(metrics["aux_loss"]) == pytest.approx(penalty, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss_fn(model.apply({"params": params}, x), {
        "targets": y})[0]), rel=1e-6)  # the task loss alone
    # The penalty's gradient (the kernel itself) is in the update: without it the step would differ.
    plain = jax.grad(lambda p: loss_fn(model.apply({"params": p}, x), {"targets": y})[0])(params)
    expected = params["Dense_0"]["kernel"] - 0.1 * (plain["Dense_0"]["kernel"] + params["Dense_0"]["kernel"])
    np.testing.assert_allclose(new.params["Dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the default tier's twin: the train-step test above, and DynamicViT's own gradient tests
def test_a_learned_method_fine_tunes_in_the_trainer_with_its_sown_loss():
    config = shapes_config(method="dynamicvit", keep="0.5", layers="1", r="")
    config.model.num_layers = 2
    run = Run(config, devices=jax.devices()[:1])
    state, it = run.init_state(), run.train_iterator()
    before = jax.device_get(state.params["tokens_1"])
    for _ in range(2):
        state, metrics = run.step(state, next(it))
    assert float(metrics["aux_loss"]) > 0 and np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params["tokens_1"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))
    assert max(moved) > 0


@pytest.mark.slow  # the default tier's twins: test_tokens_diffrate's FLOPs-loss descent and test_optim
def test_diffrates_rate_search_trains_only_the_rates_toward_the_flops_target():
    """DiffRate's recipe in the trainer: learned rates, the ViT frozen by config.trainable, the FLOPs loss
    reported as aux_loss; the rates move and nothing else does."""
    config = shapes_config(method="diffrate", r="", flops_target=0.0, flops_weight=1e4,
                           params={"diffrate": {"learned": True}})
    config.trainable = "tokens/(prune|merge)_logits"
    config.model.num_layers = 3
    config.learning_rate, config.warmup_steps, config.weight_decay = 0.5, 0, 0.05
    run = Run(config, devices=jax.devices()[:1])
    state, it = run.init_state(), run.train_iterator()
    before = jax.device_get(state.params)
    for _ in range(3):
        state, metrics = run.step(state, next(it))
    assert float(metrics["aux_loss"]) > 0 and np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params)
    assert "tokens" not in after["block_0"]  # DiffRate never compresses block 0
    changed = jax.tree_util.tree_map_with_path(lambda path, a, b: (param_path(path), bool(np.any(a != b))),
                                               after, before)
    assert {path for path, moved in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)) if moved} == {
        f"block_{i}/tokens/{name}_logits" for i in (1, 2) for name in ("prune", "merge")}

"""Every token-reduction method through the same checks inside a ViT: the schedule's counts, prefix tokens kept
first, sizes, the source map, jit with static shapes, 8 emulated devices equal to 1, identity at keep == n.
Gradients into each learned method's parameters are checked in its own test file (and through the trainer in
tests/test_tokens_model.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import effjax.models as models
from effjax import tokens as tokens_lib
from effjax.tokens.stats import AttentionStats

# Methods that are not a Reducer in the block loop, with the reason (their own tests cover them).
NOT_BLOCK_REDUCERS = {
    "ras": "runs in a diffusion sampler's loop across denoising steps, not inside a block",
}
# Schedules (and params) for methods whose shape constraints the generic ones do not meet.
SCHEDULES = {
    "token_shuffle": dict(keep=0.25, layers="1"),  # 2 x 2 windows of the 4 x 4 patch grid
}
NAMES = [name for name in tokens_lib.names() if name not in NOT_BLOCK_REDUCERS]
# One merger in the default tier (the learned pruners have their own model tests there); all in the slow.
DEFAULT_TIER = ("tome",)


# The 8-device check runs for one method of each mechanism (merging, a learned pruner before the block, a masked
# fixed capacity, many-to-many, a grid reshape, recovery): each compiles the ViT a second time, and all 16 cost
# about 200 s of CPU in the slow tier.
EIGHT_DEVICES = ("tome", "dynamicvit", "ats", "token_transforming", "token_shuffle", "hot")


def tiered(names, default=DEFAULT_TIER):
    return [name if name in default else pytest.param(name, marks=pytest.mark.slow) for name in names]
IMAGES = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3))  # 16 patches + CLS


def schedule(name):
    if name in SCHEDULES:
        return dict(SCHEDULES[name])
    if tokens_lib.spec(name).cap is not None:
        return dict(r=3)
    return dict(keep=0.7, layers="1,2")


def vit(name, **tokens):
    return models.build("vit_classifier", vocab_size=1, num_classes=10, num_layers=3, embed_dim=32, num_heads=4,
                        mlp_dim=64, pooling="cls", image_size=(16, 16), channels=3, patch_size=4, dropout_rate=0.0,
                        tokens=dict(method=name, **{**schedule(name), **tokens}))


@pytest.fixture(scope="module")
def variables():
    base = models.build("vit_classifier", vocab_size=1, num_classes=10, num_layers=3, embed_dim=32, num_heads=4,
                        mlp_dim=64, pooling="cls", image_size=(16, 16), channels=3, patch_size=4, dropout_rate=0.0)
    return jax.jit(base.init)(jax.random.key(1), IMAGES[:2])


def with_method_params(name, variables):
    """The base model's params plus the method's own (learned methods), initialised by the reduced model."""
    if not tokens_lib.spec(name).learned:
        return variables
    own = jax.jit(vit(name).init)(jax.random.key(2), IMAGES[:2])
    return {**own, "params": {**own["params"], **variables["params"]}}


@pytest.mark.parametrize("name", tiered(NAMES))
def test_inside_a_vit_counts_prefix_sizes_source_and_eight_devices_equal_one(name, variables):
    """Counts, sizes and the source map inside a ViT; on 8 devices as on one for ``EIGHT_DEVICES``."""
    model = vit(name)
    vs = with_method_params(name, variables)
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
    logits, inter = apply(vs, IMAGES)
    assert logits.shape == (8, 10) and np.all(np.isfinite(logits))
    plan = model.token_plan(17, 1)
    final = [c for c in plan.counts if c is not None][-1]
    sizes = np.asarray(inter["intermediates"]["token_sizes"][0])
    source = np.asarray(inter["intermediates"]["token_source"][0])
    assert sizes.shape == (8, final) and source.shape == (8, 17)
    assert np.all(source[:, 0] == 0) and sizes[0, 0] == pytest.approx(1.0)  # CLS first, alone
    assert np.all((source >= -1) & (source < final))
    assert np.all(sizes.sum(1) <= 17 + 1e-4) and np.all(sizes >= 0)
    if tokens_lib.spec(name).cap is not None:  # mergers keep every original token somewhere
        assert np.all(source >= 0)
        np.testing.assert_allclose(sizes.sum(1), 17, rtol=1e-5)
    if name not in EIGHT_DEVICES:
        return
    # The batch sharded over 8 emulated devices (the trainer's Auto mesh) gives the same logits and maps.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])
    images = jax.device_put(IMAGES, NamedSharding(mesh, PartitionSpec("data")))
    sharded, sharded_inter = apply(jax.device_put(vs, NamedSharding(mesh, PartitionSpec())), images)
    np.testing.assert_allclose(sharded, logits, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(sharded_inter["intermediates"]["token_source"][0], source)


def random_stats(n, key, heads=2, head_dim=4):
    q, k, v = jax.random.normal(key, (3, 2, n, heads, head_dim))
    return AttentionStats(q, k, v, key_bias=jnp.zeros((2, n)))


@pytest.mark.parametrize("name", NAMES)
def test_keep_equal_to_the_length_is_the_identity(name):
    n = 17 if name != "token_shuffle" else 16
    x = jax.random.normal(jax.random.key(3), (2, n, 8))
    start = tokens_lib.TokenState.start(2, n)
    reducer = tokens_lib.make(name)
    prefix = 1 if name != "token_shuffle" else 0
    stats = random_stats(n, jax.random.key(4))
    try:
        vs = reducer.init(jax.random.key(5), x, start, stats, keep=n, prefix=prefix)
    except ValueError as err:  # a method whose output count is fixed by its structure says so
        pytest.skip(f"{name}: {err}")
    out, state = reducer.apply(vs, x, start, stats, keep=n, prefix=prefix)
    np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.sizes, start.sizes)

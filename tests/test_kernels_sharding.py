"""Kernels under a device mesh (8 emulated CPU devices): each runs per shard through shard_map over the batch
and heads axes of the logical rules, with the same outputs, gradients and dropout bits as the unsharded call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import slow_after
from kernel_checks import assert_tree_close, inputs, jit, value_and_grads_of

from effjax.kernels import dropout, sharding
from effjax.kernels.flash_attention import BlockSizes, flash_attention

RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("length", None))
B16 = BlockSizes(16, 16, 16, 16)


def mesh(data=2, fsdp=2, tensor=2):
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def run_under(the_mesh, fn, args, cot):
    with jax.set_mesh(the_mesh), nn.logical_axis_rules(RULES):
        jaxpr = str(jax.make_jaxpr(fn)(*args))
        return value_and_grads_of(fn, args, cot), jaxpr


@pytest.mark.parametrize("heads, kv_heads, sharded_heads", slow_after([(4, 2, True), (3, 3, False)]))
def test_flash_with_dropout_per_shard_equals_the_unsharded_call(heads, kv_heads, sharded_heads):
    q, k, v, ct = inputs(21, 40, heads=heads, kv_heads=kv_heads)
    q, k, v, ct = (jnp.concatenate([x, x[::-1] * 0.5]) for x in (q, k, v, ct))  # batch 4
    mask = np.arange(40)[None, :] < np.array([[33], [40], [21], [40]])
    seg = np.repeat(np.array([[1, 2], [1, 1], [3, 4], [2, 2]]), 20, axis=1).astype(np.int32)
    seed = dropout.seed_from_key(jax.random.key(2))

    def fn(q, k, v):
        return flash_attention(q, k, v, mask=mask, segment_ids=seg, causal=True, blocks=B16, dropout_rate=0.2,
                               dropout_seed=seed)

    want = value_and_grads_of(fn, (q, k, v), ct)
    got, jaxpr = run_under(mesh(), fn, (q, k, v), ct)
    assert_tree_close(got, want, 1e-6, 1e-6)
    assert "shard_map" in jaxpr
    local_heads = heads // 2 if sharded_heads else heads
    assert f"f32[1,48,{local_heads},16]" in jaxpr  # the kernel sees one batch row (4 / (data x fsdp))


def test_no_mesh_one_device_or_no_rules_run_unsharded():
    q, k, v, _ = inputs(22, 16)
    assert sharding.plan(2, 2) is None
    with jax.set_mesh(mesh()):  # a mesh but no logical rules for batch/heads
        assert sharding.plan(4, 4) is None
        assert "shard_map" not in str(jax.make_jaxpr(lambda q: flash_attention(q, k, v, blocks=B16))(q))
    with jax.set_mesh(mesh(1, 1, 1)), nn.logical_axis_rules(RULES):
        assert sharding.plan(4, 4) is None
    with jax.set_mesh(mesh()), nn.logical_axis_rules(RULES):
        assert sharding.plan(4, 4) == {"batch": ("data", "fsdp"), "heads": "tensor"}
        assert sharding.plan(3, 4) == {"batch": None, "heads": "tensor"}
        assert sharding.plan(3, 3) is None


@pytest.mark.slow
def test_encoder_with_pallas_attention_trains_the_same_on_eight_devices():
    import effjax.models as models

    model = models.build("encoder_classifier", vocab_size=17, num_classes=5, max_length=32, num_layers=1,
                         embed_dim=32, num_heads=4, mlp_dim=32, attention="sliding_window",
                         attention_params={"sliding_window": {"window": 4}}, attention_impl="pallas",
                         dropout_rate=0.0)
    x = jax.random.randint(jax.random.key(0), (8, 24), 1, 17)
    variables = model.init(jax.random.key(1), x)

    def loss(variables):
        return jnp.sum(model.apply(variables, x) ** 2)

    want = jit(jax.value_and_grad(loss))(variables)
    with jax.set_mesh(mesh()), nn.logical_axis_rules(RULES):
        got = jit(jax.value_and_grad(loss))(variables)
    assert_tree_close(got, want, 1e-5, 1e-5)


@pytest.mark.slow  # the default tier's twin: the flash kernel per shard, above
def test_linear_attention_and_selective_scan_per_shard_equal_the_unsharded_call():
    from effjax.kernels.linear_attention import chunked_linear_attention
    from effjax.kernels.selective_scan import selective_scan

    keys = jax.random.split(jax.random.key(23), 6)
    phi_q, phi_k = (jnp.exp(0.5 * jax.random.normal(kk, (4, 24, 2, 8))) for kk in keys[:2])
    v = jax.random.normal(keys[2], (4, 24, 2, 8))
    decay = jax.nn.sigmoid(jax.random.normal(keys[3], (4, 24, 2)) + 2.0)

    def linear(phi_q, phi_k, v, decay):
        return chunked_linear_attention(phi_q, phi_k, v, causal=True, decay=decay, chunk_size=16)

    cot = jax.random.normal(keys[4], v.shape)
    want = value_and_grads_of(linear, (phi_q, phi_k, v, decay), cot)
    got, jaxpr = run_under(mesh(), linear, (phi_q, phi_k, v, decay), cot)
    assert_tree_close(got, want, 1e-5, 1e-5)
    assert "shard_map" in jaxpr and "f32[1,32,1,16]" in jaxpr  # one batch row and one head per shard

    x = jax.random.normal(keys[5], (4, 20, 2, 4))
    a_log = jnp.zeros((2, 4, 4)) + 0.3
    bc = jax.random.normal(keys[0], (4, 20, 2, 4))

    def scan(x, a_log, bc):
        return selective_scan(x, jax.nn.softplus(x), a_log, bc, bc * 0.5, jnp.ones((2, 4)), chunk_size=8)

    want = value_and_grads_of(scan, (x, a_log, bc), x)
    got, jaxpr = run_under(mesh(), scan, (x, a_log, bc), x)
    assert_tree_close(got, want, 1e-5, 1e-5)
    assert "shard_map" in jaxpr

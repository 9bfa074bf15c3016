"""One train step function on 1 device and on 8 emulated devices under several meshes: same curve."""

import jax
import numpy as np
import pytest
from helpers import slow_after

from configs import lra_listops
from effjax.train import sharding
from effjax.train.trainer import Run


def small_config(data=1, fsdp=1, tensor=1):
    c = lra_listops.get_config("smoke")
    c.model.num_heads = 8  # divisible by tensor=8
    c.model.embed_dim = 64
    c.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


def run_steps(run, batches):
    state = run.init_state()
    losses = []
    for batch in batches:
        state, metrics = run.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference():
    run = Run(small_config(), devices=jax.devices()[:1])
    it = run.train_iterator()
    batches = [next(it) for _ in range(3)]
    return batches, run_steps(run, batches)


@pytest.mark.parametrize("mesh", slow_after([(2, 2, 2), (8, 1, 1), (1, 8, 1), (1, 1, 8)], unpack=False))
def test_eight_device_meshes_match_one_device(reference, mesh):
    assert jax.device_count() == 8
    batches, (ref_losses, ref_params) = reference
    run = Run(small_config(*mesh))
    assert dict(run.mesh.shape) == dict(zip(sharding.MESH_AXES, mesh, strict=True))
    losses, params = run_steps(run, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    assert losses[-1] != losses[0]  # the steps did update the model


def test_parameters_are_really_sharded_on_fsdp_and_tensor():
    run = Run(small_config(1, 2, 4))
    state = run.init_state()
    wi = state.params["trunk"]["block_0"]["mlp"]["wi"]["kernel"]  # (embed, mlp)
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (wi.shape[0] // 2, wi.shape[1] // 4)


def test_mesh_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="At most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_batch_not_divisible_by_data_parallel_size_fails_at_once():
    c = small_config(8, 1, 1)
    c.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the data-parallel mesh size 8"):
        Run(c)

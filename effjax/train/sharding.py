"""Device mesh, batch sharding and per-process batch assembly."""

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Resolves config.mesh (one axis may be -1) to a shape whose product is ``num_devices``."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    unknown = [a for a, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"At most one of config.mesh.{{data,fsdp,tensor}} may be -1, got {dict(mesh_config)}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {dict(mesh_config)}.")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(mesh_config)}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {known}.")
        sizes[MESH_AXES.index(unknown[0])] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(mesh_config)} has {math.prod(sizes)} devices but "
                         f"{num_devices} are available; set one axis to -1 to absorb the rest.")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes data, fsdp, tensor (Auto mode) over ``devices``, by default all of every process."""
    count = jax.device_count() if devices is None else len(devices)
    shape = mesh_shape(mesh_config, count)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh, rules) -> NamedSharding:
    """Sharding of a batch's leading axis under the logical rule for 'batch' (other axes replicated)."""
    return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(("batch",), rules)))


def batch_shards(mesh, rules) -> int:
    """How many ways the batch axis is split across devices."""
    spec = batch_sharding(mesh, rules).spec[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles per-process numpy rows into global jax Arrays sharded along the batch axis."""
    process_count = jax.process_count()

    def to_global(x):
        x = np.asarray(x)
        shape = (x.shape[0] * process_count, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(to_global, local_batch)

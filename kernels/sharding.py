"""Kernels under a device mesh: run each ``pallas_call`` per shard with ``jax.shard_map``.

XLA does not partition a Pallas kernel: under ``jit`` with sharded inputs it all-gathers them and every
device computes the whole batch. So when an ambient mesh is set (``jax.set_mesh``, as the trainer does),
the kernels wrap their core in ``shard_map`` over the mesh axes that flax's logical axis rules give to
``"batch"`` and ``"heads"`` (the model annotates q, k, v with those names). An axis whose size the mesh
axes do not divide stays replicated. Without a mesh, with a one-device mesh, without rules for these names,
or inside a ``shard_map`` already, the core runs as it is.
"""

import math

import jax
from jax.sharding import PartitionSpec

BATCH, HEADS = "batch", "heads"


def _size(mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[name] for name in ((axes,) if isinstance(axes, str) else axes))


def plan(batch: int, *head_counts: int):
    """``{BATCH: mesh axes or None, HEADS: mesh axes or None}`` for the ambient mesh, or None (no sharding)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    from flax import linen as nn

    batch_axes, head_axes = nn.logical_to_mesh_axes((BATCH, HEADS))
    axes = {
        BATCH: batch_axes if _size(mesh, batch_axes) > 1 and batch % _size(mesh, batch_axes) == 0 else None,
        HEADS: head_axes if _size(mesh, head_axes) > 1 and all(
            count % _size(mesh, head_axes) == 0 for count in head_counts) else None,
    }
    return axes if any(value is not None for value in axes.values()) else None


def per_shard(fn, args, dims, out_dims, *, batch: int, head_counts=()):
    """``fn(shard, *args)`` once per shard of the ambient mesh (or once, unsharded).

    ``dims`` mirrors ``args`` (a pytree prefix): for each array a tuple naming its leading axes
    (``BATCH``, ``HEADS`` or None), or None for an array every shard gets whole. ``out_dims`` likewise
    for the outputs. ``shard`` maps BATCH and HEADS to this shard's index along them (0 when unsharded),
    e.g. for global positions in counter-based random numbers. ``head_counts``: every heads size that
    must divide (query heads and kv heads).
    """
    axes = plan(batch, *head_counts)
    if axes is None:
        return fn({BATCH: 0, HEADS: 0}, *args)

    def spec(names):
        return PartitionSpec() if names is None else PartitionSpec(*(axes.get(n) if n else None for n in names))

    def is_dims(node):
        return node is None or isinstance(node, tuple) and all(n in (None, BATCH, HEADS) for n in node)

    def body(*local):
        shard = {name: 0 if axes[name] is None else jax.lax.axis_index(axes[name]) for name in (BATCH, HEADS)}
        return fn(shard, *local)

    in_specs = tuple(jax.tree.map(spec, d, is_leaf=is_dims) for d in dims)
    out_specs = jax.tree.map(spec, out_dims, is_leaf=is_dims)
    return jax.shard_map(body, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

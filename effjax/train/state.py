"""The train state pytree and its sharded initialisation."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

# Auxiliary training losses a model sows (``self.sow(AUX_LOSSES, name, value)``, already weighted), e.g.
# DynamicViT's keep-ratio loss: the train step minimises their sum plus the task loss and reports the two apart
# (``loss`` is the task loss alone, ``aux_loss`` the sown sum).
AUX_LOSSES = "losses"


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the data iterator."""

    step: jax.Array
    params: Any
    model_state: Any  # the model's other variable collections (e.g. batch_stats), updated by each train step
    opt_state: Any
    rng: jax.Array  # raw key data of the run's base key; per-step keys are fold_in(rng, step)


def make_init_fn(model, tx, sample_inputs):
    """Returns ``init(seed) -> TrainState`` with logically partitioned (boxed) leaves."""

    def init(seed):
        base = jax.random.key(seed)
        params_key, dropout_key = jax.random.split(jax.random.fold_in(base, 0))
        variables = model.init({"params": params_key, "dropout": dropout_key}, sample_inputs,
                               deterministic=True)
        params = variables["params"]
        # Sown training losses are per step, not state (flax's init already leaves out intermediates).
        model_state = {name: tree for name, tree in variables.items() if name not in ("params", AUX_LOSSES)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.fold_in(base, 1)))

    return init


def sharded_init(init_fn, seed, mesh, rules):
    """Returns (init() -> sharded TrainState, its shardings, its abstract shape) without initialising."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, seed)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)

    def init():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(lambda s: nn.meta.unbox(init_fn(s)), out_shardings=shardings)(seed)

    return init, shardings, abstract


def param_shapes(params) -> dict[str, list[int]]:
    """{'path/to/param': shape} for compatibility checks against a checkpoint."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    return {k: list(v.shape) for k, v in sorted(flat.items())}

"""Pure train and eval steps; the trainer partials in the model, optimizer and loss, then jits."""

import jax
import jax.numpy as jnp
import optax

from effjax.train.optim import param_path
from effjax.train.state import AUX_LOSSES, TrainState

# Params whose name starts with this are fixed buffers (e.g. Performer's random projection): they live in
# the "params" collection so checkpoints carry them, but no update (weight decay included) changes them.
FROZEN_PREFIX = "frozen_"



def _is_frozen(path) -> bool:
    return param_path(path).rsplit("/", 1)[-1].startswith(FROZEN_PREFIX)


def keep_frozen(new_params, old_params):
    """``new_params`` with every ``frozen_*`` param reset to its value in ``old_params``."""
    return jax.tree_util.tree_map_with_path(lambda path, new, old: old if _is_frozen(path) else new,
                                            new_params, old_params)


def train_step(state: TrainState, batch, *, model, tx, loss_fn, schedule):
    """One optimizer step. Random keys depend only on (seed, step), so a resumed run is identical."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_key, random_key = jax.random.split(step_key)  # 'random': e.g. Performer feature redraws

    mutable = sorted(state.model_state)  # e.g. batch_stats: the new values come out of the forward pass

    def objective(params):
        variables = {"params": params, **state.model_state}
        rngs = {"dropout": dropout_key, "random": random_key}
        out, model_state = model.apply(variables, batch["inputs"], deterministic=False, rngs=rngs,
                                       mutable=[*mutable, AUX_LOSSES])
        model_state = dict(model_state)
        aux = jax.tree.leaves(model_state.pop(AUX_LOSSES, {}))
        loss, sums = loss_fn(out, batch)
        aux_loss = sum(jnp.sum(value) for value in aux) if aux else None
        return loss if aux_loss is None else loss + aux_loss, (sums, model_state, aux_loss, loss)

    (_, (sums, model_state, aux_loss, loss)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = keep_frozen(optax.apply_updates(state.params, updates), state.params)
    metrics = {
        "loss": loss,
        "accuracy": sums["accuracy"] / sums["count"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    if aux_loss is not None:
        metrics["aux_loss"] = aux_loss
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, model_state, batch, *, model, loss_fn):
    """Weighted metric sums of one eval batch (padding rows carry weight 0)."""
    out = model.apply({"params": params, **model_state}, batch["inputs"], deterministic=True)
    _, sums = loss_fn(out, batch)
    return sums

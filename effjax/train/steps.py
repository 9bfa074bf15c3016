"""Pure train and eval steps; the trainer partials in the model, optimizer and loss, then jits."""

import jax
import optax

from effjax.train.state import TrainState


def train_step(state: TrainState, batch, *, model, tx, loss_fn, schedule):
    """One optimizer step. Dropout keys depend only on (seed, step), so a resumed run is identical."""
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params):
        out = model.apply({"params": params}, batch["inputs"], deterministic=False,
                          rngs={"dropout": dropout_key})
        return loss_fn(out, batch)

    (loss, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": sums["accuracy"] / sums["count"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model, loss_fn):
    """Weighted metric sums of one eval batch (padding rows carry weight 0)."""
    out = model.apply({"params": params}, batch["inputs"], deterministic=True)
    _, sums = loss_fn(out, batch)
    return sums

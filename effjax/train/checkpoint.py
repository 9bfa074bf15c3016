"""Orbax checkpoints of the train state, the data iterator and a JSON description of the run."""

import glob
import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from effjax.train.state import param_shapes


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different model; nothing was changed."""


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async manager under ``workdir/checkpoints``; saves land atomically (temp dir, then rename)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def describe(state, config) -> dict:
    """The JSON saved beside the state: enough to refuse restoring into a different model."""
    return {
        "step": int(state.step),
        "param_shapes": param_shapes(state.params),
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
    }


def save(manager, state, data_iterator, config) -> None:
    """Starts an async save of ``state``, the iterator position and the run description."""
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(describe(state, config)),
    ))


def check_compatible(manager, abstract_state) -> int | None:
    """Returns the latest step, or None; raises if its parameters do not fit ``abstract_state``."""
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    want = param_shapes(abstract_state.params)
    have = meta["param_shapes"]
    if want != have:
        diffs = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        shown = "; ".join(f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}" for k in diffs[:5])
        raise IncompatibleCheckpointError(
            f"The workdir's checkpoint (step {step}, {manager.directory}) was written by a different model: "
            f"{len(diffs)} parameter(s) differ ({shown}). Nothing was changed. Use a new --workdir, or "
            f"restore the config it was trained with (its model section: {meta['model']}).")
    return step


def restore(manager, step, abstract_state, data_iterator):
    """Restores the state into the shardings of ``abstract_state`` and the iterator in place.

    A checkpoint written by another number of processes still resumes: every process's iterator
    sits at the same global batch (effjax.data.pipeline), so any process's saved position serves.
    """
    data_dir = os.path.join(str(manager.directory), str(step), "data")
    own_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if os.path.exists(os.path.join(data_dir, own_file)):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored["state"]
    saved = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
    if not saved:
        raise FileNotFoundError(f"Checkpoint step {step} has no data-iterator state under {data_dir}.")
    with open(saved[0]) as f:
        data_iterator.set_state(json.load(f))
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

"""Orbax checkpoints of the train state, the data iterator and a JSON description of the run."""

import contextlib
import glob
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict
from jax.experimental import multihost_utils

from effjax.train.state import param_shapes
from effjax.train.workdir import WorkdirError, free_space, move_aside, say

# Config fields (dotted prefixes) that may change when a run resumes: they change how long the run goes,
# how often and on which splits it evaluates (test_at_end: also the test split at the end), logs and saves, where
# data is cached and how the work is laid out on devices, never what a training step computes. Any other difference
# from the checkpoint's config is refused.
# (total_steps also sets the length of the cosine schedule: extending such a run changes its later rates.)
RESUMABLE_FIELDS = (
    "total_steps", "eval_every", "eval_max_batches", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
    "log_every", "mesh", "logical_axis_rules", "data.cache_dir", "init_from", "test_at_end",
)

CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint is renamed <step>.corrupt, which orbax does not list


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different model or run; nothing was changed."""


class CheckpointSaveError(WorkdirError):
    """A checkpoint could not be written (e.g. the disk is full); the run stopped."""


class NoRestorableCheckpointError(WorkdirError):
    """Every checkpoint in the workdir failed to restore; nothing was changed."""


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async manager under ``workdir/checkpoints``; saves land atomically (temp dir, then rename)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def plain_config(config) -> dict:
    """The config as JSON types (tuples become lists), as saved in the checkpoint."""
    return json.loads(config.to_json_best_effort())


def describe(state, config) -> dict:
    """The JSON saved beside the state: enough to refuse resuming a different run."""
    return {
        "step": int(state.step),
        "param_shapes": param_shapes(state.params),
        "config": plain_config(config),
    }


def _resumable(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every differing field outside RESUMABLE_FIELDS."""
    old, new = (flatten_dict(tree, sep=".", keep_empty_nodes=True) for tree in (saved, current))
    absent = "<absent>"
    fields = sorted(k for k in set(old) | set(new) if old.get(k, absent) != new.get(k, absent) and not _resumable(k))
    return [f"{f} {old.get(f, absent)!r} -> {new.get(f, absent)!r}" for f in fields]


def _saved_config(meta: dict) -> dict:
    """The saved config; checkpoints written before it was saved whole carry only model and data."""
    return meta.get("config") or {"model": meta.get("model", {}), "data": meta.get("data", {})}


def check_config(meta: dict, config, step: int, directory) -> None:
    """Raises IncompatibleCheckpointError when ``config`` changes the computation or data of the saved run."""
    saved = _saved_config(meta)
    current = {k: v for k, v in plain_config(config).items() if "config" in meta or k in ("model", "data")}
    diffs = config_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise IncompatibleCheckpointError(
            f"The workdir's checkpoint (step {step}, {directory}) was trained with a different config: {shown}. "
            "Nothing was changed. Use a new --workdir, or pass the old values.")


def check_shapes(meta: dict, abstract_state, step: int, directory) -> None:
    """Raises IncompatibleCheckpointError if the saved parameters do not fit ``abstract_state``."""
    want = param_shapes(abstract_state.params)
    have = meta["param_shapes"]
    if want != have:
        diffs = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        shown = "; ".join(f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}" for k in diffs[:5])
        raise IncompatibleCheckpointError(
            f"The workdir's checkpoint (step {step}, {directory}) was written by a different model: "
            f"{len(diffs)} parameter(s) differ ({shown}). Nothing was changed. Use a new --workdir, or "
            f"restore the config it was trained with (its model section: {_saved_config(meta)['model']}).")


def read_meta(manager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


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


def _one_line(error: Exception, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _move_damaged_aside(manager, damaged: list) -> None:
    """Renames each damaged checkpoint to <step>.corrupt (process 0), says so, and re-lists the checkpoints."""
    for step, error in damaged:
        if jax.process_index() == 0:
            moved = move_aside(os.path.join(str(manager.directory), str(step)), CORRUPT_SUFFIX)
            say(f"Checkpoint {step} is damaged ({_one_line(error, 160)}); moved it to {moved}.")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("effjax_moved_damaged_checkpoints")
    manager.reload()


def restore_latest(manager, config, abstract_state, data_iterator):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

    Damaged checkpoints newer than it are moved aside to ``<step>.corrupt`` with a one-line note. A
    checkpoint of another config is refused (IncompatibleCheckpointError), and if no checkpoint restores
    at all, NoRestorableCheckpointError names them all and nothing is moved.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = read_meta(manager, step)
        except Exception as error:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            damaged.append((step, error))
            continue
        check_config(meta, config, step, manager.directory)
        check_shapes(meta, abstract_state, step, manager.directory)
        try:
            state = restore(manager, step, abstract_state, data_iterator)
        except Exception as error:  # noqa: BLE001
            damaged.append((step, error))
            continue
        _move_damaged_aside(manager, damaged)
        return step, state
    if damaged:
        listed = "; ".join(f"step {s}: {_one_line(e, 120)}" for s, e in damaged)
        raise NoRestorableCheckpointError(
            f"No checkpoint in {manager.directory} restores ({listed}). Nothing was changed; move them away "
            "to start afresh, or use a new --workdir.")
    return None, None


def last_good_phrase(step: int | None) -> str:
    """'the last good checkpoint is step N', or that there is none yet."""
    return "no checkpoint was saved yet" if step is None else f"the last good checkpoint is step {step}"


class Saver:
    """Async saves whose failure stops the run at the next step with one line (and keeps the last good one)."""

    def __init__(self, manager, last_good: int | None):
        self.manager = manager
        self.last_good = last_good  # newest checkpoint known to be complete on disk
        self.last_started = last_good
        self._pending = None
        self._failed = False

    def save(self, state, data_iterator, config) -> None:
        """Starts an async save of ``state``, the iterator position and the run description."""
        step = int(state.step)
        self.finish()
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(describe(state, config)),
            ))
        except Exception as error:  # noqa: BLE001
            self._fail(step, error)
        self._pending = self.last_started = step

    def poll(self) -> None:
        """Raises CheckpointSaveError once a background save has failed; cheap while one is running."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Waits for the save in flight; raises CheckpointSaveError if it failed."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            self._fail(self._pending, error)
        if self._pending is not None:
            self.last_good, self._pending = self._pending, None

    def _fail(self, step, error):
        self._failed = True
        directory = str(self.manager.directory)
        raise CheckpointSaveError(
            f"Saving checkpoint {step} to {directory} failed ({_one_line(error)}); {free_space(directory)} "
            f"there. The run stopped; {last_good_phrase(self.last_good)}. Free some space and run the same "
            "command to resume.") from error

    def close(self) -> None:
        """Waits for the last save (unless one already failed) and closes the manager."""
        try:
            self.finish()
        finally:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()

"""``config.init_from``: start a new run from the params of an earlier run's checkpoint (fine-tuning).

Every param whose path and shape match is copied; params the earlier model lacks (a token-reduction method's
rate logits, a new head) keep their initialisation, and params the new model lacks are left behind. A path with
another shape is refused, naming it. Only the params come over: the step, optimizer state and data position
start afresh, and a run that resumes from its own checkpoint never reads ``init_from`` again.
"""

import contextlib
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from effjax.train.workdir import say


def checkpoint_dir(path: str) -> tuple[str, int]:
    """``(checkpoints directory, step)`` of ``path``: a run's workdir (its latest checkpoint) or one of its
    ``checkpoints/<step>`` directories."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    directory = os.path.join(path, "checkpoints")
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"config.init_from={path!r} has no checkpoint (no {directory}/<step>); point it at "
                                "the workdir of a run that saved one, or at its checkpoints/<step> directory.")
    return directory, steps[-1]


def load_params(path: str) -> tuple[dict, int]:
    """The saved params of ``path`` (see ``checkpoint_dir``) as a flat ``{'a/b/kernel': array}`` and the step."""
    directory, step = checkpoint_dir(path)
    return restore_params(os.path.join(directory, str(step))), step


def restore_params(directory: str) -> dict:
    """The params of checkpoint ``directory`` (``checkpoints/<step>``) as a flat ``{'a/b/kernel': array}``, on one
    device whatever mesh or device count saved them, without reading the optimizer state.

    (Restoring the whole state onto the saved shardings fails with "Topology mismatch" on a machine with other
    devices than the trainer's, e.g. a laptop sampling or fine-tuning a GPU run.)"""
    path = os.path.join(directory, "state")
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer:
        saved = getattr(checkpointer.metadata(path), "item_metadata", None)
        if saved is None or "params" not in saved:
            raise FileNotFoundError(f"orbax reads no params from the metadata of {path}")
        target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                                         saved["params"])}
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return {key: np.asarray(value) for key, value in flatten_dict(restored["params"], sep="/").items()}


@contextlib.contextmanager
def _quiet_orbax():
    """Hides orbax's warnings while it reads one item of a step ('Metadata file does not exist': that file is the
    step's, one directory up); a failure still raises."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def merge_params(params, saved: dict, source: str = "init_from"):
    """``params`` with every entry of the flat ``saved`` of the same path copied in (same shape required).

    Returns ``(params, loaded, fresh, unused)``: the new tree and the sorted paths copied, kept at their
    initialisation, and saved but not in the model. Raises when a path's shape differs or nothing matches."""
    flat = flatten_dict(params, sep="/")
    loaded, fresh = [], []
    for key, value in flat.items():
        if key not in saved:
            fresh.append(key)
            continue
        if tuple(saved[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: param {key} has shape {list(saved[key].shape)} there but "
                             f"{list(value.shape)} in this model; use the earlier run's model settings for it.")
        flat[key] = jax.device_put(saved[key].astype(value.dtype), value.sharding)
        loaded.append(key)
    if not loaded:
        raise ValueError(f"{source}: none of its {len(saved)} params is in this model (e.g. {next(iter(saved))!r} "
                         f"vs {next(iter(flat))!r}); point it at a run of the same model family.")
    unused = sorted(set(saved) - set(flat))
    return unflatten_dict(flat, sep="/"), sorted(loaded), sorted(fresh), unused


def _some(paths, shown: int = 4) -> str:
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more" if more > 0 else "")


def warm_start(state, path: str):
    """The fresh ``state`` with its params taken from ``path`` where they match; says what was loaded."""
    saved, step = load_params(path)
    params, loaded, fresh, unused = merge_params(state.params, saved, f"config.init_from={path!r}")
    note = f"Initialised {len(loaded)} of {len(loaded) + len(fresh)} params from {path} (step {step})"
    if fresh:
        note += f"; new: {_some(fresh)}"
    if unused:
        note += f"; left behind: {_some(unused)}"
    say(note + ".")
    return state.replace(params=params)

"""``config.init_from``: start a new run from the params of an earlier run's checkpoint (fine-tuning).

Every param whose path and shape match is copied; params the earlier model lacks (a token-reduction method's
rate logits, a new head) keep their initialisation, and params the new model lacks are left behind. A path with
another shape is refused, naming it. Only the params come over: the step, optimizer state and data position
start afresh, and a run that resumes from its own checkpoint never reads ``init_from`` again.
"""

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
    with ocp.CheckpointManager(directory) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return {key: np.asarray(value) for key, value in flatten_dict(state["params"], sep="/").items()}, step


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

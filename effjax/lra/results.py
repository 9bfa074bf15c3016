"""A cell's outcome: its final metrics row, and the ``result.json`` that marks it finished (written atomically).

LRA reports the last checkpoint's test accuracy (lra.md §7.3); the trainer writes it as the ``test/`` row at the
final step when the config sets ``test_at_end``. A run without that row (a trainer before ``test_at_end``) falls
back to the ``eval/`` row at the final step, and the cell is marked ``validation``.
"""

import json
import os

from effjax import files
from effjax.train import metrics
from effjax.train.workdir import WorkdirError

RESULT_NAME = "result.json"
OK, NO_DATA, FAILED = "ok", "no data", "failed"
STATUSES = (OK, NO_DATA, FAILED)


def total_steps(run_dir: str) -> int | None:
    """``total_steps`` of the run in ``run_dir`` from its config.json (the trainer writes it), or None."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return int(json.load(f)["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def final_row(run_dir: str, prefix: str) -> dict | None:
    """The ``prefix`` metrics (e.g. 'test/') at the run's final step, without the prefix; None if absent."""
    step = total_steps(run_dir)
    if step is None:
        return None
    try:
        rows = metrics.read_rows(run_dir)
    except WorkdirError:
        return None
    merged = {}
    for r in rows:
        if r["step"] == step:
            merged.update({k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)})
    return {"step": step, **merged} if "loss" in merged or "accuracy" in merged else None


def final_metrics(run_dir: str) -> dict | None:
    """{'split', 'accuracy', 'loss', 'majority_class_rate', 'step'} of a finished fine-tune, or None."""
    for prefix, split in (("test/", "test"), ("eval/", "validation")):
        row = final_row(run_dir, prefix)
        if row is not None and "accuracy" in row:
            return {"split": split, "step": row["step"], "accuracy": row.get("accuracy"), "loss": row.get("loss"),
                    "majority_class_rate": row.get("majority_class_rate")}
    return None


def write(cell_dir: str, result: dict) -> None:
    """Writes ``<cell_dir>/result.json`` atomically (a kill leaves the old file or the new one, never half)."""
    files.write_atomic(os.path.join(cell_dir, RESULT_NAME), json.dumps(result, indent=2, sort_keys=True))


def read(cell_dir: str) -> dict | None:
    """The cell's result.json, or None when absent or unreadable (then the cell is simply run again)."""
    try:
        with open(os.path.join(cell_dir, RESULT_NAME)) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("status") in STATUSES else None

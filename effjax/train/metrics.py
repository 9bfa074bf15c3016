"""Run outputs in the workdir: metrics.jsonl, TensorBoard events and config.json (process 0 only)."""

import json
import math
import os

import jax

from effjax.train.workdir import WorkdirError, move_aside, say


class MetricWriter:
    """Appends one JSON object per logging step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_rows(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` ([] if absent); WorkdirError naming the file and line if unparseable."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                row = error
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise WorkdirError(
                    f"{path} line {number} is not a metrics row ({{\"step\": int, ...}} JSON): not written by "
                    "effjax? Move the file away, or use a new --workdir. Nothing was changed.")
            rows.append(row)
    return rows


def keep_rows_through(workdir: str, step: int, rows: list[dict]) -> None:
    """Keeps the rows up to ``step`` in metrics.jsonl; if others exist, the old file is first moved aside.

    A resumed run repeats the steps after its checkpoint, so their rows would be written twice.
    """
    later = [r for r in rows if r["step"] > step]
    if not later or jax.process_index() != 0:
        return
    path = os.path.join(workdir, "metrics.jsonl")
    moved = move_aside(path, ".old")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
    say(f"{path} had {len(later)} row(s) after step {step or 0}, where this run starts; the old file is kept "
        f"as {moved} and the new one continues from step {step or 0}.")


def has_row(rows: list[dict], step: int, prefix: str) -> bool:
    """Whether a row at ``step`` has a key starting with ``prefix`` (e.g. 'eval/')."""
    return any(r["step"] == step and any(k.startswith(prefix) for k in r) for r in rows)


def write_config(workdir: str, config) -> None:
    """Writes the resolved config as config.json (atomically), on process 0.

    A different existing config.json (a previous run's before a resume that changed e.g. total_steps, or a
    user's own file) is moved aside to config.json.old[-n] first, with a one-line note.
    """
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        if _same_json(path, text):
            return
        say(f"{path} differs from this run's config; the old file is kept as {move_aside(path, '.old')}.")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _same_json(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == json.loads(text)
    except (OSError, ValueError):
        return False

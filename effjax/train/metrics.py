"""Run outputs in the workdir: metrics.jsonl, TensorBoard events and config.json (process 0 only)."""

import json
import math
import os

import jax


class MetricWriter:
    """Appends one JSON object per logging step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        self._drop_rows_after(resume_step)
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint, so their old rows are removed."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

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


def write_config(workdir: str, config) -> None:
    """Writes the resolved config as config.json (atomically), on process 0."""
    if jax.process_index() != 0:
        return
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, "config.json"))

"""Run outputs in the workdir: metrics.jsonl, TensorBoard events and config.json (process 0 only)."""

import contextlib
import json
import math
import os
import socket
import struct
import time

import jax

from effjax import files
from effjax.train.workdir import WorkdirError, free_space, move_aside, say


class MetricsWriteError(WorkdirError):
    """metrics.jsonl or the TensorBoard events could not be written (e.g. the disk is full); the run stopped."""


class MetricWriter:
    """Appends one JSON object per logging step to metrics.jsonl and mirrors scalars to TensorBoard.

    Both files are written here, in the caller's thread (tensorboardX's SummaryWriter writes in a thread that
    dies on a full disk and then blocks the run), and a failed append is undone, so no half row is left.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.events_path = None
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event  # imported here: only process 0 writes events

        directory = os.path.join(workdir, "tensorboard")
        os.makedirs(directory, exist_ok=True)
        self.events_path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        _append(self.events_path, _record(Event(wall_time=time.time(), file_version="brain.Event:2")))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        _append(self.path, (json.dumps(row) + "\n").encode())
        _append(self.events_path, b"".join(_scalar_record(step, k, v) for k, v in row.items()
                                          if k != "step" and isinstance(v, float)))

    def close(self) -> None:
        """Nothing is held open between writes; kept for callers that close their writer."""


def _append(path: str, data: bytes) -> None:
    """Appends ``data`` to ``path``, or leaves the file as it was and raises MetricsWriteError."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as error:
        with contextlib.suppress(OSError):  # truncating frees space, so it works on a full disk
            os.truncate(path, size)
        raise MetricsWriteError(f"Writing {path} failed ({error.strerror or error}); {free_space(path)} there.") \
            from error


def _record(event) -> bytes:
    """``event`` framed as a TFRecord (length, its masked crc32c, data, its masked crc32c), as TensorBoard reads."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))


def _scalar_record(step: int, tag: str, value: float) -> bytes:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    return _record(Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value)))


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
    files.write_atomic(path, text)


def _same_json(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == json.loads(text)
    except (OSError, ValueError):
        return False

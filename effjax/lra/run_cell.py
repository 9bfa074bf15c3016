"""Runs one cell: its trainer subprocess(es), its log ``<cell>/run.log`` and its ``result.json``.

``run(job)`` is a module-level function of picklable arguments, so that the search executors (local processes or
Ray tasks, ``effjax/search/executors.py``) can run it. A cell that is not finished is simply run again with the
same command: the trainer resumes from the cell's latest checkpoint.
"""

import collections
import dataclasses
import os
import subprocess
import time

from effjax.lra import cells, results

# The trainer's one-line exit for a data set that is not prepared (Text, Retrieval, Image files).
_NO_DATA_PREFIX = "effjax: FileNotFoundError:"


@dataclasses.dataclass(frozen=True)
class Job:
    cell: cells.Cell
    protocol: str
    size: str
    pretrain: bool
    overrides: tuple = ()
    root: str = "."  # the repository root: the trainer runs there (configs/ is a top-level folder)
    env: tuple = ()  # (name, value) pairs added to the environment, e.g. CUDA_VISIBLE_DEVICES
    trainer: tuple | None = None  # replaces python -m effjax.main (tests)
    data_dir: str = ""  # where this task's prepared data lies (a location: not part of the identity)

    @property
    def location_overrides(self) -> tuple:
        """The overrides with this task's ``data_dir`` added."""
        return self.overrides + ((f"--config.data.data_dir={self.data_dir}",) if self.data_dir else ())

    @property
    def identity(self) -> dict:
        """What makes a finished result.json this cell's: a different protocol, size or override reruns it."""
        return {"task": self.cell.task, "method": self.cell.method, "protocol": self.protocol, "size": self.size,
                "pretrain": self.pretrain, "overrides": list(self.overrides)}


def finished(job: Job) -> dict | None:
    """The cell's result.json if it finished (status ok) under this job's identity, else None."""
    result = results.read(job.cell.dir)
    if result is None or result["status"] != results.OK:
        return None
    return result if all(result.get(k) == v for k, v in job.identity.items()) else None


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def note(cell: cells.Cell, text: str) -> None:
    """Appends a runner line (``=== <time> <text>``) to the cell's log."""
    os.makedirs(cell.dir, exist_ok=True)
    with open(cell.log, "a") as f:
        f.write(f"=== {_stamp()} {text}\n")


def _last_line(text: str) -> str:
    """The last non-empty line of ``text``, progress bars' carriage returns included."""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r") if seg.strip()]
    return lines[-1] if lines else ""


def _run_stage(job: Job, argv: list[str], stage: str) -> tuple[int, str]:
    """Runs one trainer command with stdout and stderr appended to the cell's log; (exit code, last stderr line)."""
    note(job.cell, f"{stage}: {' '.join(argv)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(job.env)}
    start = time.time()
    last = collections.deque(maxlen=20)
    with open(job.cell.log, "a") as log:
        proc = subprocess.Popen(argv, cwd=job.root, env=env, stdout=log, stderr=subprocess.PIPE, text=True,
                                errors="replace")
        try:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                last.append(line)
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the trainer too: let it save its checkpoint before we go
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    note(job.cell, f"{stage}: exit code {code} after {time.time() - start:.0f} s")
    return code, _last_line("".join(last))


def _has_checkpoint(run_dir: str) -> bool:
    directory = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _failure(code: int, line: str, log: str) -> tuple[str, str]:
    if line.startswith(_NO_DATA_PREFIX) and "init_from" not in line:
        return results.NO_DATA, line
    return results.FAILED, f"{line or f'exit code {code}'} (log: {log})"


def run(job: Job) -> dict:
    """Runs the cell to its end (pretraining first with ``job.pretrain``) and records its result.json."""
    cell, start = job.cell, time.time()
    os.makedirs(cell.dir, exist_ok=True)
    base = {**job.identity, "log": cell.log, "dir": cell.dir}

    def record(status: str, message: str = "", **values) -> dict:
        result = {**base, "status": status, "message": message, "wall_s": round(time.time() - start, 1),
                  "finished_at": _stamp(), "split": None, "accuracy": None, "loss": None,
                  "majority_class_rate": None, "step": None, **values}
        results.write(cell.dir, result)
        return result

    init_from = ""
    if job.pretrain:
        init_from = cell.pretrain_dir
        # Once the fine-tune has a checkpoint it resumes from it and never reads init_from again.
        if results.final_row(cell.pretrain_dir, "eval/") is None and not _has_checkpoint(cell.dir):
            arg = cells.config_arg(job.protocol, job.size, "pretrain")
            argv = cells.command(cell, arg, job.location_overrides, stage="pretrain", trainer=job.trainer)
            code, line = _run_stage(job, argv, "pretrain")
            if code != 0:
                status, message = _failure(code, line, cell.log)
                return record(status, f"pretraining: {message}")
            if results.final_row(cell.pretrain_dir, "eval/") is None:
                return record(results.FAILED, f"pretraining ended without its final evaluation: {line} "
                                              f"(log: {cell.log})")
    arg = cells.config_arg(job.protocol, job.size)
    argv = cells.command(cell, arg, job.location_overrides, init_from=init_from, trainer=job.trainer)
    code, line = _run_stage(job, argv, "finetune")
    final = results.final_metrics(cell.dir)
    if code == 0 and final is not None:
        return record(results.OK, "", **final, command=argv)
    if code != 0:
        status, message = _failure(code, line, cell.log)
        return record(status, message, command=argv)
    with open(cell.log) as f:
        tail = _last_line("\n".join(ln for ln in f.read()[-4000:].splitlines() if not ln.startswith("=== ")))
    return record(results.FAILED, f"the run ended (exit code 0) without a final evaluation row: {tail} "
                                  f"(log: {cell.log})", command=argv)

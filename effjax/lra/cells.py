"""The cells of the table: name checks, planning, workdirs ``<workdir>/<task>/<method>/`` and trainer commands.

A cell is one (task, method) training run of ``python -m effjax.main`` with ``configs/lra_<task>.py`` and
``--config.model.attention=<method>``. With self-pretraining (Amos et al., "Never Train from Scratch"; lra.md
§7.1) the cell first runs ``stage=pretrain`` in ``<cell>/pretrain`` and fine-tunes from it.
"""

import dataclasses
import os
import shlex
import sys

from effjax.data.common import unknown_name_error
from effjax.lra import paper, results

TASKS = paper.TASKS
PROTOCOLS = ("lra_original", "modern")
SIZES = ("full", "cpu", "smoke")
ALL = "all"
PAPER = "paper"  # --methods=paper: the eight methods with a row in LRA Table 1
_RUNNER_SET = ("--config.model.attention", "--config.init_from")


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str
    dir: str  # the fine-tune's workdir; the pretraining stage runs in <dir>/pretrain

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}"

    @property
    def pretrain_dir(self) -> str:
        return os.path.join(self.dir, "pretrain")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "run.log")


def _split(names) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def check_tasks(names) -> list[str]:
    """The task names in suite order (``all``: every task); an unknown name raises with the valid ones."""
    names = _split(names)
    if not names:
        raise ValueError(f"--tasks is empty; pass task names ({', '.join(TASKS)}) or 'all'.")
    if ALL in names:
        return list(TASKS)
    for name in names:
        if name not in TASKS:
            raise unknown_name_error("LRA task", name, (*TASKS, ALL), " in --tasks")
    return [t for t in TASKS if t in names]


def check_methods(names, known=None) -> list[str]:
    """The method names in the given order (``all``: every attention method; ``paper``: those in Table 1)."""
    if known is None:
        from effjax import attention

        known = attention.names()
    names = _split(names)
    if not names:
        raise ValueError("--methods is empty; pass attention method names (effjax.attention.names()), 'paper' or "
                         "'all'.")
    out = []
    for name in names:
        if name == ALL:
            expanded = sorted(known)
        elif name == PAPER:
            expanded = list(paper.TABLE1)
        elif name in known:
            expanded = [name]
        else:
            raise unknown_name_error("attention method", name, (*known, ALL, PAPER), " in --methods")
        out += [n for n in expanded if n not in out]
    return out


def check_choice(flag: str, value: str, valid) -> str:
    if value not in valid:
        raise unknown_name_error(flag, value, valid)
    return value


def parse_overrides(items) -> list[str]:
    """``--config.key=value`` overrides for every cell, from strings that may hold several (shell-quoted)."""
    out = []
    for item in items or ():
        for word in shlex.split(item):
            if word.startswith("config."):
                word = "--" + word
            if not word.startswith("--config.") or "=" not in word:
                raise ValueError(f"--overrides item {word!r} is not a config override; write it as "
                                 "--config.<key>=<value>, e.g. --overrides=--config.total_steps=100.")
            if word.split("=", 1)[0] in _RUNNER_SET:
                raise ValueError(f"--overrides {word!r} sets what the runner sets per cell; choose methods with "
                                 "--methods, and self-pretraining with --pretrain.")
            out.append(word)
    return out


# The tasks whose data is read from files prepared elsewhere (config.data.data_dir).
PREPARED = ("text", "retrieval", "image")


def parse_data_dirs(items) -> dict:
    """``{task: directory}`` from ``task=DIR`` items (``--data_dir=text=~/tfds,retrieval=.../tsv_data``)."""
    out = {}
    for item in _split(items):
        task, sep, directory = item.partition("=")
        if not sep or not directory:
            raise ValueError(f"--data_dir item {item!r} is not task=DIR, e.g. --data_dir=retrieval=/data/tsv_data.")
        if task not in PREPARED:
            raise unknown_name_error("task with prepared data", task, PREPARED, " in --data_dir")
        out[task] = os.path.expanduser(directory)
    return out


def plan(workdir: str, tasks, methods) -> list[Cell]:
    """The cells, task by task (the table's columns) and method by method within a task."""
    return [Cell(t, m, os.path.join(workdir, t, m)) for t in tasks for m in methods]


def discover(workdir: str) -> tuple[list[str], list[str]]:
    """(tasks, methods) of the cells with a result.json under ``workdir`` (for ``--report_only``)."""
    tasks, methods = [], []
    for task in TASKS:
        directory = os.path.join(workdir, task)
        if not os.path.isdir(directory):
            continue
        for method in sorted(os.listdir(directory)):
            if results.read(os.path.join(directory, method)) is not None:
                tasks += [task] if task not in tasks else []
                methods += [method] if method not in methods else []
    return tasks, methods


def config_arg(protocol: str, size: str, stage: str = "finetune") -> str:
    """The task config's arg (``configs/lra_common.py``)."""
    return f"protocol={protocol},size={size},stage={stage}"


def command(cell: Cell, arg: str, overrides, *, stage: str = "finetune", init_from: str = "",
            trainer=None) -> list[str]:
    """The trainer command of one stage of ``cell``; ``trainer`` replaces ``python -m effjax.main`` (tests)."""
    prefix = list(trainer) if trainer else [sys.executable, "-m", "effjax.main"]
    workdir = cell.pretrain_dir if stage == "pretrain" else cell.dir
    argv = [*prefix, f"--config=configs/lra_{cell.task}.py:{arg}", f"--workdir={workdir}", *overrides,
            f"--config.model.attention={cell.method}"]
    return argv + ([f"--config.init_from={init_from}"] if init_from else [])

"""The table run: plan the cells, skip finished ones, run the rest a few at a time, rewrite the report as each ends.

Cells run through the search executors' protocol (``effjax/search/executors.py``: ``submit``, ``next_done``,
``close``): in this process one at a time, in local worker processes (``--parallel``, or one per device group with
``--devices``), or as Ray tasks past one machine (``--ray_address``, ``effjax/search/ray_executor.py``). A cell is
finished when its ``result.json`` says ok under the same protocol, size, pretraining and overrides; any other cell
is run again with the same command and the trainer resumes it from its checkpoint.
"""

import dataclasses
import json
import os

from effjax import files
from effjax.lra import cells, devices, report, results, run_cell

SETTINGS_NAME = "lra_run.json"


@dataclasses.dataclass
class Settings:
    workdir: str
    tasks: list
    methods: list
    protocol: str = "lra_original"
    size: str = "full"
    pretrain: bool = False
    overrides: tuple = ()
    data_dirs: tuple = ()  # 'task=DIR' items: where a task's prepared data lies
    parallel: int = 0  # 0: one, or one per device group with devices
    devices: tuple = ()
    gpus_per_cell: int = 0  # devices per cell: 0 is 1 with devices, none for a Ray task
    device_platform: str = "gpu"
    ray_address: str = ""
    report_only: bool = False
    trainer: tuple | None = None  # replaces python -m effjax.main (tests)
    plot: bool = True


def find_root() -> str:
    """The repository root the trainer runs in: the working directory or the one above the effjax package."""
    import effjax

    for candidate in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(effjax.__file__)))):
        if os.path.isdir(os.path.join(candidate, "configs")):
            return candidate
    raise ValueError("No configs/ folder here or beside the effjax package; run python -m effjax.lra from the "
                     "effjax repository root.")


def _load_settings(workdir: str) -> dict | None:
    path = os.path.join(workdir, SETTINGS_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_settings(workdir: str, mine: dict, overrides: list) -> None:
    """Refuses a workdir whose cells were run with another protocol, size or pretraining (a mixed table); records
    this run's settings and overrides (the header of a later ``--report_only``)."""
    theirs = _load_settings(workdir)
    if theirs is not None:
        differ = {k: theirs.get(k) for k in mine if theirs.get(k) != mine[k]}
        if differ:
            held = ", ".join(f"{k}={v}" for k, v in differ.items())
            raise ValueError(f"--workdir={workdir} holds a run with {held}; pass the same settings to continue it, "
                             "or use a new --workdir.")
    os.makedirs(workdir, exist_ok=True)
    files.write_atomic(os.path.join(workdir, SETTINGS_NAME), json.dumps({**mine, "overrides": overrides}, indent=2))


def _describe(result: dict) -> str:
    if result["status"] == results.OK:
        text = f"{result['split']} accuracy {100 * result['accuracy']:.2f}%"
        if result.get("majority_class_rate") is not None:
            text += f" (majority class {100 * result['majority_class_rate']:.2f}%)"
        return f"{text} at step {result['step']}"
    return f"{result['status']}: {result['message']}"


def _executor(s: Settings, slots: int):
    if s.ray_address:
        from effjax.search.ray_executor import RayExecutor

        return RayExecutor(s.ray_address, slots, num_gpus=s.gpus_per_cell)
    from effjax.search.executors import InlineExecutor, ProcessExecutor

    return InlineExecutor(1) if slots == 1 else ProcessExecutor(slots)


def run(s: Settings, say=print) -> int:
    """Runs (or with ``report_only`` reports) the table; returns the exit code (1 when a cell failed)."""
    workdir = os.path.abspath(s.workdir)
    cells.check_choice("--protocol", s.protocol, cells.PROTOCOLS)
    cells.check_choice("--size", s.size, cells.SIZES)
    overrides = tuple(cells.parse_overrides(s.overrides))
    data_dirs = cells.parse_data_dirs(s.data_dirs)
    if s.report_only and not (s.tasks and s.methods):
        found_tasks, found_methods = cells.discover(workdir)
        tasks = cells.check_tasks(s.tasks) if s.tasks else found_tasks
        methods = cells.check_methods(s.methods) if s.methods else found_methods
        if not (tasks and methods):
            raise ValueError(f"--report_only: no finished cells under --workdir={workdir}.")
    else:
        tasks, methods = cells.check_tasks(s.tasks or ""), cells.check_methods(s.methods or "")
    identity = {"protocol": s.protocol, "size": s.size, "pretrain": s.pretrain}
    if s.report_only:  # the settings the cells ran with, not this command's defaults
        settings = _load_settings(workdir) or {**identity, "overrides": list(overrides)}
    else:
        _check_settings(workdir, identity, list(overrides))
        settings = {**identity, "overrides": list(overrides)}
    plan = cells.plan(workdir, tasks, methods)
    known = {(c.task, c.method): results.read(c.dir) for c in plan}

    def write_report():
        return report.write(workdir, settings, methods, tasks, known, plot=s.plot)

    if s.report_only:
        doc = write_report()
        say(f"lra: report of {len(plan)} cells rebuilt: {_counts(doc)}. Table: {workdir}/lra_results.md")
        return 0

    root = find_root()
    groups = devices.groups(s.devices, s.gpus_per_cell or 1) if s.devices and not s.ray_address else []
    slots = max(1, s.parallel or len(groups) or 1)
    if groups:
        slots = min(slots, len(groups))
    jobs, skipped = [], 0
    for cell in plan:
        job = run_cell.Job(cell, s.protocol, s.size, s.pretrain, overrides, root, (), s.trainer,
                           data_dirs.get(cell.task, ""))
        if run_cell.finished(job) is not None:
            skipped += 1
            run_cell.note(cell, "skipped: finished earlier (result.json)")
            say(f"lra: skipped {cell.name}: finished earlier, {_describe(known[(cell.task, cell.method)])}")
        else:
            jobs.append(job)
    write_report()
    executor = _executor(s, slots)
    free = list(range(slots))
    in_flight: dict[int, tuple] = {}
    done = 0
    try:
        while jobs or in_flight:
            while jobs and free:
                slot, job = free.pop(0), jobs.pop(0)
                env = devices.env(groups[slot], slot, s.device_platform) if groups else {}
                job = dataclasses.replace(job, env=tuple(env.items()))
                where = f" on devices {','.join(groups[slot])}" if env else ""
                say(f"lra: start {job.cell.name}{where} ({len(in_flight) + done + skipped + 1} of {len(plan)})")
                in_flight[executor.submit(run_cell.run, (job,))] = (slot, job)
            handle, outcome = executor.next_done(timeout=None) or (None, None)
            if handle is None:
                continue
            slot, job = in_flight.pop(handle)
            free.append(slot)
            done += 1
            result = outcome["value"] if outcome["ok"] else _worker_failure(job, outcome["reason"])
            known[(job.cell.task, job.cell.method)] = result
            write_report()
            say(f"lra: done {job.cell.name}: {_describe(result)} in {outcome['wall']:.0f} s "
                f"[{done + skipped} of {len(plan)}]")
    except KeyboardInterrupt:
        say("lra: interrupted; the running cells saved a checkpoint where they could. Run the same command to "
            "resume: finished cells are skipped.")
        return 130
    finally:
        executor.close()
        doc = write_report()
    say(f"lra: {len(plan)} cells: {_counts(doc)} ({skipped} skipped as finished). Table: {workdir}/lra_results.md")
    return 1 if doc["counts"][results.FAILED] else 0


def _worker_failure(job, reason: str) -> dict:
    """The record of a cell whose worker died (or whose Ray task failed) before it could write one."""
    result = {**job.identity, "status": results.FAILED, "message": f"{reason} (log: {job.cell.log})",
              "log": job.cell.log, "dir": job.cell.dir, "split": None, "accuracy": None, "loss": None,
              "majority_class_rate": None, "step": None}
    os.makedirs(job.cell.dir, exist_ok=True)
    results.write(job.cell.dir, result)
    return result


def _counts(doc: dict) -> str:
    return ", ".join(f"{n} {status}" for status, n in doc["counts"].items() if n) or "none"

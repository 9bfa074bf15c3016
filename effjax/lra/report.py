"""The results table in LRA Table 1's layout (Tay et al. 2021, lra.md §2), with both averages (lra.md §7.2, §8).

``<workdir>/lra_results.md``: one row per method, columns ListOps (with the run's majority-class rate), Text,
Retrieval, Image, Pathfinder, Path-X, the 5-task LRA average and the 6-task average (S4 onward: a failed Path-X,
or one below 50, counts as 50), and under it the paper's row for the same model. ``lra_results.json`` holds every
cell; ``lra_results.png`` the grouped bar chart (``plot``). All three are rewritten atomically.
"""

import json
import os
import time

from effjax import files
from effjax.lra import paper, results

TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
          "pathfinder": "Pathfinder", "pathx": "Path-X"}
PENDING = "not run"
PATHX_FLOOR = 50.0


def percent(cell: dict | None) -> float | None:
    """A finished cell's accuracy in percent, else None."""
    if not cell or cell.get("status") != results.OK or cell.get("accuracy") is None:
        return None
    return 100.0 * float(cell["accuracy"])


def averages(by_task: dict[str, dict | None]) -> dict[str, float | None]:
    """{'lra5': mean of the five tasks without Path-X, 'lra6': mean of six with Path-X floored at 50}.

    An average needs every task it covers; a Path-X cell that failed counts as 50, one without data or not run
    leaves the 6-task average empty.
    """
    five = [percent(by_task.get(t)) for t in paper.FIVE_TASKS]
    if any(v is None for v in five):
        return {"lra5": None, "lra6": None}
    pathx = by_task.get("pathx") or {}
    if pathx.get("status") == results.FAILED:
        x = PATHX_FLOOR
    elif percent(pathx) is not None:
        x = max(percent(pathx), PATHX_FLOOR)
    else:
        return {"lra5": sum(five) / 5, "lra6": None}
    return {"lra5": sum(five) / 5, "lra6": (sum(five) + x) / 6}


def paper_averages(method: str) -> dict[str, float] | None:
    """The paper row's averages: 5-task as printed, 6-task recomputed with Path-X (FAIL) as 50."""
    row = paper.row(method)
    if row is None:
        return None
    return {"lra5": paper.printed_average(method), "lra6": (sum(row[t] for t in paper.FIVE_TASKS) + 50) / 6}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def cell_text(cell: dict | None) -> str:
    """One table cell: the accuracy (ListOps: with the majority-class rate), '(val)' when from validation, or the
    status."""
    if not cell or cell.get("status") not in results.STATUSES:
        return PENDING
    if cell["status"] != results.OK:
        return cell["status"]
    text = _fmt(percent(cell))
    if cell.get("task") == "listops" and cell.get("majority_class_rate") is not None:
        text += f" (maj. {100 * cell['majority_class_rate']:.2f})"
    return text + (" (val)" if cell.get("split") == "validation" else "")


def _table(methods, tasks, grid) -> list[str]:
    head = ["Method", *(TITLES[t] for t in paper.TASKS), "LRA (5 tasks)", "6 tasks (Path-X ≥ 50)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        by_task = grid[method]
        avg = averages(by_task)
        row = [cell_text(by_task.get(t)) if t in tasks else PENDING for t in paper.TASKS]
        lines.append("| " + " | ".join([f"`{method}`", *row, _fmt(avg["lra5"]), _fmt(avg["lra6"])]) + " |")
        ref = paper.row(method)
        if ref is not None:
            pavg = paper_averages(method)
            values = ["FAIL" if ref[t] is None else f"{ref[t]:.2f}" for t in paper.TASKS]
            lines.append("| " + " | ".join([f"↳ paper: {paper.model_name(method)}", *values, _fmt(pavg["lra5"]),
                                            _fmt(pavg["lra6"])]) + " |")
    return lines


def build(settings: dict, methods, tasks, cells: dict) -> dict:
    """The JSON document: settings, every cell (``cells[(task, method)]``: a result.json or None) and averages."""
    grid = {m: {t: cells.get((t, m)) for t in tasks} for m in methods}
    listed = [cells.get((t, m)) or {"task": t, "method": m, "status": PENDING} for m in methods for t in tasks]
    counts = {s: sum(c["status"] == s for c in listed) for s in (*results.STATUSES, PENDING)}
    return {**settings, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tasks": list(tasks),
            "methods": list(methods), "counts": counts, "cells": listed,
            "averages": {m: averages(grid[m]) for m in methods},
            "paper": {m: {"model": paper.model_name(m), "accuracy": paper.row(m), **paper_averages(m)}
                      for m in methods if paper.row(m) is not None},
            "source": "Tay et al. 2021, Long Range Arena, Table 1 (shared/methods/lra.md §2)"}


def markdown(doc: dict) -> str:
    methods, tasks = doc["methods"], doc["tasks"]
    grid = {m: {} for m in methods}
    for c in doc["cells"]:
        if c["status"] != PENDING:
            grid[c["method"]][c["task"]] = c
    counts = ", ".join(f"{n} {s}" for s, n in doc["counts"].items() if n)
    overrides = " ".join(doc.get("overrides") or []) or "none"
    lines = [
        "# Long Range Arena results (effjax)", "",
        f"protocol={doc['protocol']}, size={doc['size']}, self-pretraining: {'yes' if doc['pretrain'] else 'no'}; "
        f"overrides: {overrides}; written {doc['written']}. Cells: {counts}.", "",
        "Accuracy (%) on the test split at the last step (LRA reports the last checkpoint, lra.md §7.3); "
        "'(val)' marks a cell read from the validation row because the run wrote no test row. "
        "The '↳ paper' rows are LRA Table 1 (Tay et al. 2021) for the model the method implements.", "",
        *_table(methods, tasks, grid), "",
        f"- {paper.LISTOPS_NOTE}", f"- {paper.AVERAGES_NOTE}",
        "- An average needs all of its tasks; '—' marks one that is incomplete.",
    ]
    problems = [c for c in doc["cells"] if c["status"] in (results.NO_DATA, results.FAILED)]
    if problems:
        lines += ["", "## Cells without a result", ""]
        lines += [f"- {c['task']}/{c['method']} ({c['status']}): {c.get('message', '')}" for c in problems]
    return "\n".join(lines) + "\n"


def write(workdir: str, settings: dict, methods, tasks, cells: dict, *, plot: bool = True) -> dict:
    """Writes lra_results.md, .json and (with matplotlib) .png in ``workdir``; returns the JSON document."""
    doc = build(settings, methods, tasks, cells)
    os.makedirs(workdir, exist_ok=True)
    files.write_atomic(os.path.join(workdir, "lra_results.json"), json.dumps(doc, indent=2) + "\n")
    files.write_atomic(os.path.join(workdir, "lra_results.md"), markdown(doc))
    if plot:
        from effjax.lra import plot as plot_lib

        plot_lib.write(doc, os.path.join(workdir, "lra_results.png"))
    return doc

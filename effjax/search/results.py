"""Readable outputs of a search, derived from its journal alone: ``candidates.csv``, ``best.json``, ``best.txt``
and ``fitness.png`` in the search's work directory."""

import csv
import json
import os

from effjax.search import journal as journal_lib


def best_of(records: list[dict]) -> dict | None:
    """The lowest-fitness record among fully trained candidates (status ``finished``); when none finished, among
    those stopped at a hurdle; ``None`` when every candidate failed. Ties go to the earlier id."""
    done = [r for r in records if r.get("status") == "finished"]
    done = done or [r for r in records if r.get("status", "failed") != "failed" and r.get("fitness") is not None]
    return min(done, key=lambda r: (r["fitness"], r["id"])) if done else None


def front_of(records: list[dict], names) -> list[dict]:
    """The fully trained records no other one Pareto-dominates over the objectives ``names`` (lower is better),
    in id order; with one objective, the records tied for the best fitness."""
    done = [r for r in records if r.get("status") == "finished"]
    if not done:
        return []
    from effjax.search.pareto import pareto_front

    front = pareto_front([[r["objectives"][n] for n in names] for r in done])
    return sorted((done[i] for i in front), key=lambda r: r["id"])


def records(workdir: str) -> tuple[list[str], list[dict]]:
    """``(objective names, one record per created candidate in id order)`` replayed from ``workdir``'s journal;
    a candidate with neither ``finished`` nor ``failed`` has status ``in flight``."""
    header, events, _ = journal_lib.read(os.path.join(workdir, journal_lib.FILENAME))
    if header is None:
        raise ValueError(f"{workdir} holds no search journal: pass the --workdir of a search")
    names = list(header.get("config", {}).get("objectives", ["fitness"]))
    rows: dict[int, dict] = {}
    for e in events:
        kind = e.get("event")
        if kind == "created":
            rows[e["id"]] = {"id": e["id"], "parent": e.get("parent"), "mutation": e.get("mutation"),
                             "candidate": e.get("candidate"), "status": "in flight", "objectives": {},
                             "fitness": None, "cost": {}, "info": {}, "wall": None, "reason": ""}
        elif kind in ("finished", "failed") and e["id"] in rows:
            row = rows[e["id"]]
            row.update(status=e.get("status", kind), wall=e.get("wall"), reason=e.get("reason", ""))
            if kind == "finished":
                row.update(objectives=e["objectives"], fitness=e["fitness"], cost=e.get("cost", {}),
                           info=e.get("info", {}))
    return names, [rows[i] for i in sorted(rows)]


def _plot(path: str, rows: list[dict], name: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: matplotlib is slow to import
    from matplotlib.figure import Figure

    done = [r for r in rows if r["fitness"] is not None]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    full = [r for r in done if r["status"] == "finished"]
    part = [r for r in done if r["status"] != "finished"]
    ax.scatter([r["id"] for r in full], [r["fitness"] for r in full], s=8, label="finished")
    ax.scatter([r["id"] for r in part], [r["fitness"] for r in part], s=8, alpha=0.4, label="stopped at a hurdle")
    best, xs, ys = float("inf"), [], []
    for r in full:
        best = min(best, r["fitness"])
        xs.append(r["id"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="k", label="running best")
    ax.set_xlabel("candidate")
    ax.set_ylabel(f"{name} (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(workdir: str, space, plot: bool = True) -> dict:
    """Writes the outputs beside the journal and returns their paths by name."""
    names, rows = records(workdir)
    paths = {k: os.path.join(workdir, f) for k, f in
             [("csv", "candidates.csv"), ("json", "best.json"), ("txt", "best.txt"), ("png", "fitness.png")]}
    with open(paths["csv"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "parent", "mutation", "status", *names, "cost", "info", "wall", "reason"])
        for r in rows:
            wall = "" if r["wall"] is None else f"{r['wall']:.3f}"
            out.writerow([r["id"], "" if r["parent"] is None else r["parent"], r["mutation"], r["status"],
                          *[r["objectives"].get(n, "") for n in names], json.dumps(r["cost"], sort_keys=True),
                          json.dumps(r["info"], sort_keys=True), wall, r["reason"]])
    best = best_of(rows)
    if best is not None:
        with open(paths["json"], "w") as f:
            json.dump(best["candidate"], f, indent=1)
        with open(paths["txt"], "w") as f:
            f.write(f"candidate {best['id']}: {json.dumps(best['objectives'])}\n\n")
            f.write(space.describe(space.from_json(best["candidate"])) + "\n")
    if plot:
        _plot(paths["png"], rows, names[0])
    if len(names) > 1:  # several objectives: the Pareto front, as a table and against the fitness
        front = front_of(rows, names)
        paths["front"] = os.path.join(workdir, "front.csv")
        with open(paths["front"], "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["id", *names, "candidate"])
            for r in front:
                out.writerow([r["id"], *[r["objectives"][n] for n in names], json.dumps(r["candidate"])])
        if plot and front:
            paths["front_png"] = os.path.join(workdir, "front.png")
            _plot_front(paths["front_png"], rows, front, names)
    return paths


def _plot_front(path: str, rows: list[dict], front: list[dict], names: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "finished"]
    fig = Figure(figsize=(5 * (len(names) - 1), 4))
    FigureCanvasAgg(fig)
    for i, other in enumerate(names[1:]):
        ax = fig.add_subplot(1, len(names) - 1, i + 1)
        ax.scatter([r["objectives"][other] for r in done], [r["fitness"] for r in done], s=8, alpha=0.5,
                   label="finished")
        ax.scatter([r["objectives"][other] for r in front], [r["fitness"] for r in front], s=16, color="r",
                   label="Pareto front")
        ax.set_xlabel(other)
        ax.set_ylabel(names[0])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

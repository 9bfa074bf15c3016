"""Steady-state regularized evolution (Real et al. 2019) with Primer's halving hurdles (So et al. 2021).

The controller keeps a FIFO population of at most ``population`` members. While it holds fewer, new candidates
are the space's seeds (cycling; a seed already evaluated is mutated instead, so each seed runs once); then each
new candidate is a mutant of the best of ``tournament`` members drawn at random, and the oldest member leaves
when a new one joins. A child whose ``space.key`` equals its parent's or any earlier candidate's is mutated again.

Each candidate runs band by band; after band ``k`` the controller (never the worker) decides hurdle ``k`` from
the journal's history (``hurdles.passes``) and journals the decision. A candidate stopped at a hurdle still joins
the population with the fitness it reached; one that raises, returns a non-finite objective, times out or kills
its worker is journaled ``failed`` with a one-line reason and leaves no member.

Determinism: every decision about candidate ``n`` draws from ``np.random.default_rng([seed, n])``, and results
are consumed in submission order whatever order workers finish in, so a search is a pure function of (seed,
config, ``in_flight``) and the evaluator. Resume is re-execution: the controller runs from the start, takes every
result, hurdle and candidate the journal already holds instead of recomputing it, writes only what is missing,
and submits what was in flight; it therefore ends where an uninterrupted run ends. With several objectives,
tournaments compare by Pareto rank, then crowding distance (NSGA-II, ``effjax.search.pareto``).

Journal events (``effjax.search.journal``), one line each, in the order the controller consumes results:
``created`` (id, parent, mutation, candidate, key, seed), ``band`` (id, band, objectives, cost, wall),
``hurdle`` (id, k, passed, fitness, median), ``finished`` (id, status ``finished`` or ``stopped at hurdle k``,
candidate, objectives, fitness, cost and wall summed over bands, bands) and ``failed`` (id, band, status,
reason, candidate). Only ``wall`` differs between two runs of one search.

Spawned workers re-import the caller's main module: a script that builds a ``ProcessExecutor`` needs an
``if __name__ == "__main__":`` guard.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time

import numpy as np

from effjax.search import hurdles
from effjax.search.executors import InlineExecutor
from effjax.search.journal import Journal
from effjax.search.replay import Recorded
from effjax.search.results import best_of, front_of

MAX_RETRIES = 100  # re-mutations of a duplicate child before it is accepted anyway


@dataclasses.dataclass
class SearchResult:
    population: list[dict]  # member records, oldest first
    history: list[dict]  # every finished or failed candidate's record, in the order results were consumed
    best: dict | None  # results.best_of(history)
    front: list[dict]  # the non-dominated finished records over every objective (results.front_of)
    stopped: str | None = None  # None: max_candidates reached; "wall" or "sigterm": stopped early (resumable);
    # "seed failed: <reason>": a seed candidate failed, so the search cannot go on (fix the evaluator or space)


def evaluate_band(evaluator, candidate_json: dict, band: int, candidate_dir: str, seed: int) -> dict:
    """The task an executor runs: one band of one candidate."""
    os.makedirs(candidate_dir, exist_ok=True)
    return evaluator.run_band(candidate_json, band, candidate_dir, seed)


def _check(value, names) -> str | None:
    """Why a band's return value is unusable, in one line, or None."""
    if not isinstance(value, dict) or not isinstance(value.get("objectives"), dict):
        return f"run_band returned {type(value).__name__}, not {{'objectives': {{...}}, 'cost': {{...}}}}"
    for name in names:
        if name not in value["objectives"]:
            return f"run_band returned no objective {name!r} (it returned {sorted(value['objectives'])})"
        try:
            x = float(value["objectives"][name])
        except (TypeError, ValueError):
            return f"objective {name!r} is not a number: {value['objectives'][name]!r}"
        if not math.isfinite(x):
            return f"objective {name!r} is {x} (non-finite)"
    if not isinstance(value.get("cost", {}), dict):
        return f"run_band returned cost {value.get('cost')!r}, not a dict of numbers"
    try:
        json.dumps(value.get("cost", {}), allow_nan=False)
    except (TypeError, ValueError):
        return f"cost {value.get('cost')!r} is not plain finite JSON"
    return None


class _Search:
    def __init__(self, space, evaluator, journal, executor, *, population, tournament, seed, min_history,
                 objectives, in_flight, max_candidates, deadline, bar):
        self.space, self.evaluator, self.journal, self.executor = space, evaluator, journal, executor
        self.P, self.S, self.seed, self.min_history = population, tournament, seed, min_history
        self.names, self.in_flight, self.deadline, self.bar = list(objectives), in_flight, deadline, bar
        self.rec = Recorded(journal.events)
        self.limit = max([max_candidates] + [n + 1 for n in self.rec.created])  # never strand journaled work
        self.n_bands = evaluator.bands()
        self.seeds = list(space.seeds())
        self.workdir = os.path.dirname(journal.path)
        self.members: list[int] = []  # population ids, oldest first
        self.records: dict[int, dict] = {}  # id -> record once finished or failed
        self.history: list[int] = []
        self.at_band: list[list[float]] = [[] for _ in range(self.n_bands)]  # fitness after each band, in order
        self.seen: dict[str, int] = {}  # key -> first id with it
        self.cands: dict[int, object] = {}  # id -> candidate (for parents)
        self.active: dict[int, dict] = {}
        self.pending: dict[int, tuple[int, int]] = {}  # submission seq -> (id, band)
        self.ready: dict[int, dict] = {}  # seq -> outcome, buffered until its turn
        self.handles: dict[int, int] = {}  # executor handle -> seq
        self.next_id = self.next_seq = self.n_init = 0
        self.stopped: str | None = None

    def _write(self, ident: tuple, event: dict) -> None:
        if ident not in self.rec.written:
            self.journal.append(event)

    def _child(self, parent, parent_key: str, rng) -> tuple[object, str, str]:
        child, descs = parent, []
        for _ in range(MAX_RETRIES):
            child, desc = self.space.mutate(child, rng)
            descs.append(desc)
            key = self.space.key(child)
            if key != parent_key and key not in self.seen:
                break
        return child, key, "; ".join(descs)[:300]

    def _tournament(self, rng) -> int:
        pick = rng.choice(len(self.members), size=min(self.S, len(self.members)), replace=False)
        if len(self.names) == 1:
            return self.members[min(pick, key=lambda i: self.records[self.members[i]]["fitness"])]
        from effjax.search.pareto import nsga2_order

        points = [[self.records[m]["objectives"][n] for n in self.names] for m in self.members]
        rank = {idx: r for r, idx in enumerate(nsga2_order(points))}
        return self.members[min(pick, key=lambda i: rank[i])]

    def _create(self, n: int) -> None:
        rng = np.random.default_rng([self.seed, n])
        init = len(self.members) < self.P
        base = self.seeds[self.n_init % len(self.seeds)] if init else None
        self.n_init += init
        if n in self.rec.created:
            e = self.rec.created[n]
            cand, key, parent = self.space.from_json(e["candidate"]), e["key"], e["parent"]
            cseed = e["seed"]
        else:
            if init and self.space.key(base) not in self.seen:
                cand, key, parent, mutation = base, self.space.key(base), None, "seed"
            else:
                parent = self.seen[self.space.key(base)] if init else self._tournament(rng)
                pcand = base if init else self.cands[parent]
                cand, key, mutation = self._child(pcand, self.space.key(pcand), rng)
            cseed = int(np.random.default_rng([self.seed, n, 1]).integers(2**31))
            self.journal.append({"event": "created", "id": n, "parent": parent, "mutation": mutation,
                                 "candidate": self.space.to_json(cand), "key": key, "seed": cseed})
        self.seen.setdefault(key, n)
        self.cands[n] = cand
        self.active[n] = {"json": self.space.to_json(cand), "key": key, "parent": parent, "seed": cseed,
                          "cost": {}, "wall": 0.0}
        self._submit(n, 0)

    def _submit(self, n: int, band: int) -> None:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.pending[seq] = (n, band)
        if (n, band) in self.rec.results:
            self.ready[seq] = self.rec.results[(n, band)]
            return
        a = self.active[n]
        cdir = os.path.join(self.workdir, "candidates", f"{n:06d}")
        handle = self.executor.submit(evaluate_band, (self.evaluator, a["json"], band, cdir, a["seed"]))
        self.handles[handle] = seq

    def _fill(self) -> None:
        while not self.should_stop() and len(self.active) < self.in_flight and self.next_id < self.limit:
            self.next_id += 1
            self._create(self.next_id - 1)

    def should_stop(self) -> bool:
        if self.stopped is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped = "wall"
        return self.stopped is not None

    def _await(self, seq: int) -> dict | None:
        while seq not in self.ready:
            if self.should_stop():
                return None
            got = self.executor.next_done(timeout=0.25)
            if got is not None and got[0] in self.handles:
                self.ready[self.handles.pop(got[0])] = got[1]
        return self.ready.pop(seq)

    def _consume(self, seq: int, outcome: dict) -> None:
        n, band = self.pending.pop(seq)
        a = self.active[n]
        a["wall"] += outcome.get("wall", 0.0)
        reason = _check(outcome["value"], self.names) if outcome["ok"] else outcome["reason"]
        if reason is not None:
            self._write(("failed", n), {"event": "failed", "id": n, "band": band, "status": "failed",
                                        "reason": reason, "candidate": a["json"], "fitness": None,
                                        "wall": a["wall"]})
            if a["parent"] is None:  # nothing can evolve from a seed that does not train: stop, say why
                self.stopped = f"seed failed: {reason}"
            return self._done(n, {"status": "failed", "reason": reason, "objectives": {}, "fitness": None})
        objectives = {name: float(outcome["value"]["objectives"][name]) for name in self.names}
        cost = outcome["value"].get("cost", {})
        self._write(("band", n, band), {"event": "band", "id": n, "band": band, "objectives": objectives,
                                        "cost": cost, "wall": outcome.get("wall", 0.0)})
        for k, v in cost.items():
            a["cost"][k] = a["cost"].get(k, 0) + v if isinstance(v, int | float) else v
        a["info"] = outcome["value"].get("info", {})  # the last band's descriptive values (params, s/step)
        fitness = objectives[self.names[0]]
        status = "finished"
        if band < self.n_bands - 1:
            passed = self.rec.hurdles.get((n, band))
            if passed is None:
                passed = hurdles.passes(fitness, self.at_band[band], self.min_history)
            earlier = self.at_band[band]
            median = float(np.median(earlier)) if len(earlier) >= self.min_history else None
            self._write(("hurdle", n, band), {"event": "hurdle", "id": n, "k": band, "passed": passed,
                                              "fitness": fitness, "median": median})
            self.at_band[band].append(fitness)
            if passed:
                return self._submit(n, band + 1)
            status = f"stopped at hurdle {band}"
        else:
            self.at_band[band].append(fitness)
        self._write(("finished", n), {"event": "finished", "id": n, "status": status, "candidate": a["json"],
                                      "objectives": objectives, "fitness": fitness, "cost": a["cost"],
                                      "info": a.get("info", {}), "wall": a["wall"], "bands": band + 1})
        self._done(n, {"status": status, "reason": "", "objectives": objectives, "fitness": fitness})

    def _done(self, n: int, fields: dict) -> None:
        a = self.active.pop(n)
        # What a candidate kept between bands (its train state) is not needed once it is done: the journal holds
        # its result, and a search of thousands of candidates would otherwise fill the disk.
        shutil.rmtree(os.path.join(self.workdir, "candidates", f"{n:06d}"), ignore_errors=True)
        self.records[n] = {"id": n, "parent": a["parent"], "key": a["key"], "candidate": a["json"],
                           "cost": a["cost"], "info": a.get("info", {}), "wall": a["wall"], **fields}
        self.history.append(n)
        if fields["status"] == "failed":
            del self.cands[n]
        else:
            self.members.append(n)
            if len(self.members) > self.P:
                del self.cands[self.members.pop(0)]  # only members are ever parents
        self.bar.update(1)

    def run(self) -> SearchResult:
        self._fill()
        while self.pending and not self.should_stop():
            seq = min(self.pending)
            outcome = self._await(seq)
            if outcome is None:
                break
            self._consume(seq, outcome)
            self._fill()
        for handle in list(self.handles):  # stopped early: what is in flight is re-run on resume
            self.executor.cancel(handle)
        history = [self.records[n] for n in self.history]
        return SearchResult([self.records[n] for n in self.members], history, best_of(history),
                            front_of(history, self.names), self.stopped)


def run_search(space, evaluator, *, workdir: str, fingerprint: dict, max_candidates: int, population: int = 100,
               tournament: int = 10, seed: int = 0, executor=None, in_flight: int | None = None,
               min_history: int = 10, objectives=("fitness",), max_wall_seconds: float | None = None,
               progress: bool = True) -> SearchResult:
    """Runs (or resumes) a search in ``workdir`` until ``max_candidates`` candidates are done, ``max_wall_seconds``
    pass or SIGTERM arrives; returns the population, the history and the best record.

    ``fingerprint`` is the caller's plain config dict; with the search's own settings it ties ``workdir`` to this
    search (another search there raises). ``executor`` defaults to an ``InlineExecutor``; ``in_flight`` (candidates
    evaluated at once, default ``executor.workers``) is part of the fingerprint because it shapes the search."""
    if tournament < 1 or population < 1:
        raise ValueError(f"population={population}, tournament={tournament}: both must be >= 1 (Primer: 100, 10)")
    if not objectives:
        raise ValueError("objectives is empty: name at least the fitness, e.g. objectives=('fitness',)")
    owned = executor is None
    executor = InlineExecutor() if owned else executor
    in_flight = in_flight or getattr(executor, "workers", 1)
    config = {"space": space.name, "bands": evaluator.bands(), "population": population, "tournament": tournament,
              "seed": seed, "min_history": min_history, "objectives": list(objectives), "in_flight": in_flight,
              "config": fingerprint}
    journal = Journal(workdir, config, space.name)
    from tqdm.auto import tqdm

    bar = tqdm(total=max_candidates, desc=f"search {space.name}", unit="cand", disable=not progress)
    deadline = None if max_wall_seconds is None else time.monotonic() + max_wall_seconds
    search = _Search(space, evaluator, journal, executor, population=population, tournament=tournament, seed=seed,
                     min_history=min_history, objectives=objectives, in_flight=in_flight,
                     max_candidates=max_candidates, deadline=deadline, bar=bar)
    handler = threading.current_thread() is threading.main_thread()
    if handler:
        previous = signal.signal(signal.SIGTERM, lambda *_: setattr(search, "stopped", "sigterm"))
    try:
        return search.run()
    finally:
        if handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        bar.close()
        journal.close()
        if owned:
            executor.close()

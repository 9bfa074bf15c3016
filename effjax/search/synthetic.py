"""A synthetic search space and evaluator for sub-second tests of the search engine.

A candidate is a tuple of ``length`` digits (0..9); the seed is all zeros; a mutation re-draws one digit (the
same digit one time in ten: a no-op the engine must mutate again). The fitness is the L1 distance to ``TARGET``,
scaled by ``2**(bands-1-b)`` after band ``b`` (like a loss that falls with training, the last band gives the
distance itself). Knobs make chosen candidates misbehave: a digit ``v`` at position ``p`` (``(p, v)``) raises,
returns NaN, sleeps or kills its worker process.

``python -m effjax.search.synthetic --workdir DIR --seed S --max-candidates N`` runs a small search (with
``--sleep`` seconds per band) and writes the outputs; rerunning the same command resumes it.
"""

import argparse
import dataclasses
import os
import time

import numpy as np

TARGET = (3, 1, 4, 1, 5, 9, 2, 6)


@dataclasses.dataclass(frozen=True)
class DigitSpace:
    """Tuples of ``length`` digits; ``key`` is the tuple itself, so every distinct tuple is a distinct program."""

    length: int = 8
    name: str = "synthetic"

    def seeds(self) -> list[tuple]:
        return [(0,) * self.length]

    def mutate(self, candidate: tuple, rng: np.random.Generator) -> tuple[tuple, str]:
        pos, value = int(rng.integers(self.length)), int(rng.integers(10))
        child = candidate[:pos] + (value,) + candidate[pos + 1:]
        return child, f"set {pos}={value}"

    def key(self, candidate: tuple) -> str:
        return "".join(map(str, candidate))

    def to_json(self, candidate: tuple) -> dict:
        return {"digits": list(candidate)}

    def from_json(self, data: dict) -> tuple:
        digits = data.get("digits") if isinstance(data, dict) else None
        if (not isinstance(digits, list) or len(digits) != self.length
                or not all(type(d) is int and 0 <= d <= 9 for d in digits)):
            raise ValueError(f"a synthetic candidate is {{'digits': [{self.length} ints in 0..9]}}, got {data!r}: "
                             "pass a candidate written by DigitSpace.to_json")
        return tuple(digits)

    def describe(self, candidate: tuple) -> str:
        dist = sum(abs(a - b) for a, b in zip(candidate, TARGET, strict=False))
        return f"digits {' '.join(map(str, candidate))} (L1 distance {dist} to target {' '.join(map(str, TARGET))})"


@dataclasses.dataclass(frozen=True)
class DigitEvaluator:
    """Scores a digit tuple band by band. ``objectives`` may add ``"size"`` (the digit sum) for Pareto tests.
    ``raise_on``/``nan_on``/``sleep_on``/``die_on`` are ``(position, digit)``: a candidate with that digit there
    raises, returns NaN, sleeps ``slow_seconds``, or ends its process with ``os._exit(3)``."""

    n_bands: int = 3
    objectives: tuple = ("fitness",)
    sleep: float = 0.0  # seconds per band, for every candidate
    raise_on: tuple | None = None
    nan_on: tuple | None = None
    sleep_on: tuple | None = None
    slow_seconds: float = 30.0
    die_on: tuple | None = None

    def bands(self) -> int:
        return self.n_bands

    def run_band(self, candidate_json: dict, band: int, candidate_dir: str, seed: int) -> dict:
        digits = DigitSpace(len(candidate_json["digits"])).from_json(candidate_json)
        hit = lambda rule: rule is not None and digits[rule[0]] == rule[1]
        if self.sleep:
            time.sleep(self.sleep)
        if hit(self.die_on):
            os._exit(3)
        if hit(self.sleep_on):
            time.sleep(self.slow_seconds)
        if hit(self.raise_on):
            raise RuntimeError(f"synthetic failure: digit {self.raise_on[1]} at position {self.raise_on[0]}")
        dist = float(sum(abs(a - b) for a, b in zip(digits, TARGET, strict=False)))
        values = {"fitness": dist * 2.0 ** (self.n_bands - 1 - band), "size": float(sum(digits))}
        if hit(self.nan_on):
            values["fitness"] = float("nan")
        return {"objectives": {name: values[name] for name in self.objectives}, "cost": {"steps": 2**band}}


def main(argv=None) -> None:
    from effjax.search import evolution, results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-candidates", type=int, default=200)
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--tournament", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per band")
    args = parser.parse_args(argv)
    space, evaluator = DigitSpace(), DigitEvaluator(sleep=args.sleep)
    result = evolution.run_search(
        space, evaluator, workdir=args.workdir, fingerprint={"synthetic": 1}, max_candidates=args.max_candidates,
        population=args.population, tournament=args.tournament, seed=args.seed, min_history=5,
        in_flight=args.in_flight)
    results.write_outputs(args.workdir, space)
    if result.stopped:
        print(f"stopped ({result.stopped}) after {len(result.history)} candidates: rerun the same command to resume")
    print(f"best: {result.best and space.describe(space.from_json(result.best['candidate']))}")


if __name__ == "__main__":
    main()

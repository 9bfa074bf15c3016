"""What the search engine needs from a search space, and what it asks an evaluator.

The engine (``effjax.search.evolution``) never looks inside a candidate: a ``Space`` makes seeds, mutates,
names the computation a candidate performs (``key``: equal keys mean the same computation, so a child equal to
its parent or to anything evaluated is mutated again) and turns candidates into JSON and back. Program search
(``effjax.search.program_space``) and NAS over the attention zoo (``effjax.search.nas_space``) are two spaces;
``effjax.search.synthetic`` is a third for sub-second tests.

An evaluation runs in bands (Primer's halving hurdles): the engine asks for band 0, then, if the candidate
passes the hurdle after it, band 1, and so on. ``Evaluator.run_band`` is a plain function of picklable data so
it runs in a spawned worker process or a Ray task; what a candidate needs between bands (its params) it keeps
under its own directory ``candidate_dir``, which makes a band resumable after a crash.
"""

from typing import Any, Protocol

import numpy as np

Candidate = Any  # a space's own immutable value (a Program, a genome dict...)


class Space(Protocol):
    name: str

    def seeds(self) -> list[Candidate]:
        """The initial members (Primer's conceptual initialisation: copies of the Transformer)."""

    def mutate(self, candidate: Candidate, rng: np.random.Generator) -> tuple[Candidate, str]:
        """A child and a short description of the mutation (e.g. 'insert square at s2:3')."""

    def key(self, candidate: Candidate) -> str:
        """A stable hash of the candidate's canonical form (dead code removed): equal keys, same computation."""

    def to_json(self, candidate: Candidate) -> dict:
        """JSON types only; ``from_json(to_json(c))`` has the same key as ``c``."""

    def from_json(self, data: dict) -> Candidate:
        """Rebuilds a candidate; a malformed or tampered object raises ValueError in one line."""

    def describe(self, candidate: Candidate) -> str:
        """Text a person reads (a program listing, a per-layer table)."""


class Evaluator(Protocol):
    """Trains/scores candidates band by band. Lower objective values are better."""

    def bands(self) -> int:
        """How many bands a full evaluation has (hurdles + 1)."""

    def run_band(self, candidate_json: dict, band: int, candidate_dir: str, seed: int) -> dict:
        """Runs band ``band`` (0-based) of one candidate and returns
        ``{"objectives": {name: float, ...}, "cost": {...}, "info": {...}}``: the objectives after this band
        (the first one the engine is asked for is the fitness hurdles compare), costs the engine sums over bands
        (seconds, steps, FLOPs) and optional descriptive values of the last band (params, seconds per step).
        Raises to fail the candidate; a non-finite objective also fails it."""

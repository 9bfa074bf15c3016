"""Program search as a ``Space`` (``effjax.search.space``): seeded with the Transformer program, mutated by
Primer's mutations, keyed by the canonical form. Presets (``search.md`` §5.5):

- ``full``: every primitive and calls, every subprogram (Primer's space, for accelerators);
- ``rediscovery``: 9 ops (square, relu, max, dconv3, dense, add, mul, scale, shift) in the head and
  feed-forward subprograms only, so squared ReLU and the depthwise conv after a projection are one or two
  mutations from the seed (a CPU search of minutes can find them).
"""

import dataclasses

import numpy as np

from effjax.search import mutations, seeds
from effjax.search import program as program_lib
from effjax.search.program import Program

REDISCOVERY_OPS = ("square", "relu", "max", "dconv3", "dense", "add", "mul", "scale", "shift")
PRESETS = ("full", "rediscovery")


@dataclasses.dataclass
class ProgramSpace:
    seed: Program
    vocabulary: mutations.Vocabulary = mutations.Vocabulary()
    name: str = "program"
    retries: int = 100

    def seeds(self) -> list[Program]:
        return [self.seed]

    def mutate(self, candidate: Program, rng: np.random.Generator) -> tuple[Program, str]:
        """A child whose computation differs from the parent's (Primer re-mutates an equal child)."""
        parent = program_lib.key(candidate)
        for _ in range(self.retries):
            child, how = mutations.mutate_once(candidate, self.vocabulary, rng)
            if program_lib.key(child) != parent:
                return child, how
        return child, how

    def key(self, candidate: Program) -> str:
        return program_lib.key(candidate)

    def to_json(self, candidate: Program) -> dict:
        return program_lib.to_json(candidate)

    def from_json(self, data: dict) -> Program:
        return program_lib.from_json(data)

    def describe(self, candidate: Program) -> str:
        return program_lib.listing(candidate)

    def model_fields(self, candidate: Program) -> dict:
        """Fields of the decoder-LM model that train this candidate (its block, every layer)."""
        return {"program": program_lib.to_json(candidate)}


def make(preset: str, *, embed_dim: int, num_heads: int, mlp_dim: int) -> ProgramSpace:
    """The ``preset`` space seeded with the Transformer of these sizes."""
    seed = seeds.vanilla(embed_dim, num_heads, mlp_dim)
    if preset == "full":
        return ProgramSpace(seed, name="program:full")
    if preset == "rediscovery":
        vocab = mutations.Vocabulary(ops=REDISCOVERY_OPS, subprograms=(seeds.HEAD, seeds.FEED_FORWARD))
        return ProgramSpace(seed, vocab, name="program:rediscovery")
    raise ValueError(f"Unknown program search preset {preset!r}; known: {', '.join(PRESETS)}.")

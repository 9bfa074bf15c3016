"""Program search as a ``Space`` (``effjax.search.space``): seeded with the Transformer program, mutated by
Primer's mutations, keyed by the canonical form. Presets (``search.md`` §5.5):

- ``full``: every primitive and calls, every subprogram (Primer's space, for accelerators);
- ``rediscovery``: 9 ops (square, relu, max, dconv3, dense, add, mul, scale, shift) in the head and
  feed-forward subprograms only, mostly inserts (``REDISCOVERY_WEIGHTS``), each reading the state before it
  and spliced into the dataflow (``Vocabulary.chain``, effjax's restriction), so squared ReLU and the depthwise
  conv after a projection are each one mutation from the seed: about 1 child in 40 is one of them (1/2
  subprogram x 2/3 insert x 1/9 op x the right position: 1/4 in the feed-forward, 3/8 in the head), which a
  10-minute CPU search of about 70 candidates can find. Primer's own inserts read random states and splice
  half the time, which puts them near 1 in 1,500.
"""

import dataclasses

import numpy as np

from effjax.search import mutations, seeds
from effjax.search import program as program_lib
from effjax.search.program import Program

REDISCOVERY_OPS = ("square", "relu", "max", "dconv3", "dense", "add", "mul", "scale", "shift")
REDISCOVERY_WEIGHTS = (1, 4, 0, 1, 0, 0)  # mutations.KINDS: delete, insert, delete_insert, field, swap, bank
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
        vocab = mutations.Vocabulary(ops=REDISCOVERY_OPS, subprograms=(seeds.HEAD, seeds.FEED_FORWARD),
                                     weights=REDISCOVERY_WEIGHTS, splice=1.0, chain=True)
        return ProgramSpace(seed, vocab, name="program:rediscovery")
    raise ValueError(f"Unknown program search preset {preset!r}; known: {', '.join(PRESETS)}.")


def primer_finds(program: Program) -> dict:
    """Whether a program's live computation holds Primer's two finds: ``square`` of a ``relu`` (squared ReLU),
    and a depthwise conv of a ``dense`` projection whose output feeds attention (``t_matmul`` or ``matmul``)."""
    found = {"squared_relu": False, "dconv_after_projection": False}

    def inputs(trace, node):
        return [trace.nodes[ref[1]] for ref in node.inputs if ref[0] == "node"]

    def walk(trace):
        for node in trace.nodes:
            args = inputs(trace, node)
            if node.op == "square" and any(a.op == "relu" for a in args):
                found["squared_relu"] = True
            if node.op in ("t_matmul", "matmul") and any(
                    a.op.startswith("dconv") and any(b.op == "dense" for b in inputs(trace, a)) for a in args):
                found["dconv_after_projection"] = True
            if node.body is not None:
                walk(node.body)

    walk(program_lib.trace(program))
    return found

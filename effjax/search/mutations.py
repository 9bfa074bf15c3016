"""Primer's mutations of a program (So et al. 2021 App. A.3, as ``search.md`` §1.3 lists them): delete, insert,
delete + insert, mutate a field, swap two instructions, mutate a bank value.

Every mutation returns a valid program. Instructions read states by index, so an edit keeps the rest of the
dataflow where it was: inserting shifts later references past the new state (and, with probability
``Vocabulary.splice``, splices the new instruction in: later readers of its first input read it instead, e.g.
``square`` after a ``relu``); deleting sends the deleted state's readers to its first input; swapping swaps the
references to the two states. ``Vocabulary.chain`` makes an inserted instruction read the state just before it
(effjax's restriction for the CPU rediscovery preset: with splicing, every insert then lands on the dataflow).
"""

import dataclasses

import numpy as np

from effjax.search import primitives as prims
from effjax.search.program import Instruction, Program

KINDS = ("delete", "insert", "delete_insert", "field", "swap", "bank")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What mutations may write: ``ops`` (primitive names; 'call' adds calls to later subprograms), the
    ``subprograms`` they may edit (None: all), the probability ``weights`` of each mutation kind (``KINDS``),
    the probability ``splice`` that an insert is spliced into the dataflow, and ``chain``: an inserted
    instruction reads the state just before it (Primer: random inputs)."""

    ops: tuple = tuple(prims.PRIMITIVES) + ("call",)
    subprograms: tuple | None = None
    weights: tuple = (1, 1, 1, 1, 1, 1)
    splice: float = 0.5
    chain: bool = False


def _first(s: int) -> int:
    """Index of the first state an instruction of subprogram ``s`` appends (after its inputs)."""
    return 1 if s == 0 else 2


def _remap(ins: Instruction, fn) -> Instruction:
    return dataclasses.replace(ins, in1=fn(ins.in1), in2=fn(ins.in2))


def _replace_sub(program: Program, s: int, sub) -> Program:
    subs = list(program.subprograms)
    subs[s] = tuple(sub)
    return dataclasses.replace(program, subprograms=tuple(subs))


def random_instruction(program: Program, s: int, position: int, vocab: Vocabulary, rng) -> Instruction:
    states = _first(s) + position
    ops = [op for op in vocab.ops if op != "call"]
    later = range(s + 1, len(program.subprograms))
    if "call" in vocab.ops and len(later):
        ops.append("call")
    op = str(rng.choice(ops))
    if op == "call":
        op = f"{prims.CALL_PREFIX}{int(rng.choice(later))}"
    return Instruction(op, int(rng.integers(states)), int(rng.integers(states)),
                       int(rng.integers(len(program.constants))), int(rng.integers(len(program.dims))),
                       int(rng.choice(prims.BRANCHES, p=[0.6, 0.1, 0.1, 0.1, 0.1])))


def delete(program: Program, s: int, rng) -> tuple[Program, str]:
    sub = list(program.subprograms[s])
    if len(sub) < 2:
        return program, "delete (nothing to delete)"
    p = int(rng.integers(len(sub)))
    state = _first(s) + p
    source = sub[p].in1 % state  # readers of the deleted state read its first input instead

    def fn(i):
        return source if i == state else (i - 1 if i > state else i)

    new = [_remap(ins, fn) for ins in sub[:p] + sub[p + 1:]]
    return _replace_sub(program, s, new), f"delete s{s}:{p} ({sub[p].op})"


def insert(program: Program, s: int, vocab: Vocabulary, rng) -> tuple[Program, str]:
    sub = list(program.subprograms[s])
    p = int(rng.integers(len(sub) + 1))
    state = _first(s) + p
    ins = random_instruction(program, s, p, vocab, rng)
    if vocab.chain:
        ins = dataclasses.replace(ins, in1=state - 1)
    splice = bool(rng.random() < vocab.splice)

    def fn(i):
        if splice and i == ins.in1:
            return state
        return i + 1 if i >= state else i

    new = sub[:p] + [ins] + [_remap(x, fn) for x in sub[p:]]
    return _replace_sub(program, s, new), f"insert {ins.op} at s{s}:{p}{' (spliced)' if splice else ''}"


def mutate_field(program: Program, s: int, vocab: Vocabulary, rng) -> tuple[Program, str]:
    sub = list(program.subprograms[s])
    if not sub:
        return insert(program, s, vocab, rng)
    p = int(rng.integers(len(sub)))
    fresh = random_instruction(program, s, p, vocab, rng)
    field = str(rng.choice(["op", "in1", "in2", "const", "dim", "branches"]))
    sub[p] = dataclasses.replace(sub[p], **{field: getattr(fresh, field)})
    return _replace_sub(program, s, sub), f"field {field}={getattr(fresh, field)} at s{s}:{p}"


def swap(program: Program, s: int, rng) -> tuple[Program, str]:
    sub = list(program.subprograms[s])
    if len(sub) < 2:
        return program, "swap (nothing to swap)"
    i, j = sorted(int(x) for x in rng.choice(len(sub), 2, replace=False))
    a, b = _first(s) + i, _first(s) + j

    def fn(k):
        return b if k == a else (a if k == b else k)

    sub[i], sub[j] = sub[j], sub[i]
    return _replace_sub(program, s, [_remap(x, fn) for x in sub]), f"swap s{s}:{i}<->{j}"


def mutate_bank(program: Program, rng) -> tuple[Program, str]:
    if rng.integers(2):
        k = int(rng.integers(len(program.constants)))
        consts = list(program.constants)
        consts[k] = float(consts[k] * 10.0 ** rng.normal() + rng.normal())  # x 10^X + Y, X, Y ~ N(0, 1)
        return dataclasses.replace(program, constants=tuple(consts)), f"constant {k} -> {consts[k]:.4g}"
    k = int(rng.integers(len(program.dims)))
    dims = list(program.dims)
    dims[k] = int(rng.choice(prims.DIMS))
    return dataclasses.replace(program, dims=tuple(dims)), f"dim {k} -> {dims[k]}"


def mutate_once(program: Program, vocab: Vocabulary, rng: np.random.Generator) -> tuple[Program, str]:
    """One random mutation (kind drawn by ``vocab.weights``) of a subprogram ``vocab`` allows."""
    subs = vocab.subprograms if vocab.subprograms is not None else range(len(program.subprograms))
    s = int(rng.choice(list(subs)))
    weights = np.asarray(vocab.weights, float)
    kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
    if kind == "delete":
        return delete(program, s, rng)
    if kind == "insert":
        return insert(program, s, vocab, rng)
    if kind == "delete_insert":
        program, first = delete(program, s, rng)
        program, second = insert(program, s, vocab, rng)
        return program, f"{first}; {second}"
    if kind == "field":
        return mutate_field(program, s, vocab, rng)
    if kind == "swap":
        return swap(program, s, rng)
    return mutate_bank(program, rng)

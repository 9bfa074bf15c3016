"""A decoder block as a program (Primer's "DNA", So et al. 2021 §2 and App. A; ``search.md`` §1.2, §5.1).

A ``Program`` is a bank of subprograms; subprogram 0 is the block. Each subprogram is a list of
``Instruction``s over a list of hidden states that starts with its inputs (the block input; a called
subprogram's two arguments) and grows by one state per instruction. An instruction holds every field any op
reads (two input indices, a constant-bank index, a dim-bank index, a branch count); its op reads only its own,
and the rest stay, dead, for a later mutation (Primer's and AutoML-Zero's always-valid encoding). Input indices
are taken modulo the number of states so far. ``call:j`` runs subprogram ``j > i`` on (in1, in2) in
``branches`` parallel copies with their own parameters, concatenated (how multi-head attention is written).
A subprogram returns its last feature (``F``) state; the block's output is truncated or zero-padded to the
model width (our fixed rule where Primer resolves mismatched shapes automatically, §6 of search.md).

``trace`` resolves a program into the computation it performs: kinds checked (an instruction whose inputs do
not fit passes its first input through), calls expanded per call site, dead code removed. The interpreter runs
the trace, and ``key`` hashes its canonical text, so programs that differ only in dead code, unread fields or
bank entries nobody reads are the same candidate.
"""

import dataclasses
import hashlib
import json

from effjax.search import primitives as prims

FORMAT = "effjax-program/1"


@dataclasses.dataclass(frozen=True)
class Instruction:
    op: str
    in1: int = 0
    in2: int = 0
    const: int = 0  # index into Program.constants
    dim: int = 0  # index into Program.dims
    branches: int = 1


@dataclasses.dataclass(frozen=True)
class Program:
    subprograms: tuple  # of tuples of Instruction
    constants: tuple = (1.0,)
    dims: tuple = (16,)  # relative widths, each from primitives.DIMS

    def __post_init__(self):
        check(self)


def check(program: Program) -> None:
    """ValueError naming the first problem: unknown op, a call that is not to a later subprogram, a bank index
    out of range, a branch count or relative dim outside Primer's vocabularies."""
    if not program.subprograms:
        raise ValueError("A program needs at least one subprogram (the block).")
    if not program.constants or not program.dims:
        raise ValueError("A program needs a non-empty constant bank and dim bank.")
    for dim in program.dims:
        if dim not in prims.DIMS:
            raise ValueError(f"Program dim bank holds {dim!r}; relative dims are one of {prims.DIMS}.")
    for s, sub in enumerate(program.subprograms):
        for i, ins in enumerate(sub):
            where = f"subprogram {s} instruction {i}"
            if prims.is_call(ins.op):
                try:
                    target = prims.callee(ins.op)
                except ValueError:
                    raise ValueError(f"{where}: bad call {ins.op!r}; write 'call:<j>'.") from None
                if not s < target < len(program.subprograms):
                    raise ValueError(f"{where}: {ins.op} must call a later subprogram "
                                     f"({s + 1}..{len(program.subprograms) - 1}): calls are acyclic.")
            else:
                prims.get(ins.op)
            if not 0 <= ins.const < len(program.constants) or not 0 <= ins.dim < len(program.dims):
                raise ValueError(f"{where}: const {ins.const} / dim {ins.dim} outside the banks "
                                 f"({len(program.constants)} constants, {len(program.dims)} dims).")
            if ins.branches not in prims.BRANCHES:
                raise ValueError(f"{where}: branches {ins.branches} is not one of {prims.BRANCHES}.")
            if ins.in1 < 0 or ins.in2 < 0:
                raise ValueError(f"{where}: input indices must be >= 0, got {ins.in1}, {ins.in2}.")


# --- the computation a program performs -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Node:
    """One live instruction at one call site. ``inputs``: refs, ``('in', k)`` (the k-th argument) or
    ``('node', n)`` (node n of the same trace); ``const``/``dim`` only when the op reads them."""

    index: int  # the instruction's position in its subprogram (its parameters' name)
    op: str
    inputs: tuple
    kind: str
    const: float | None = None
    dim: int | None = None
    branches: int = 1
    body: "Trace | None" = None  # a call's subprogram, traced for these argument kinds


@dataclasses.dataclass(frozen=True)
class Trace:
    subprogram: int
    nodes: tuple
    output: tuple  # a ref


def trace(program: Program, subprogram: int = 0, input_kinds: tuple = (prims.F,)) -> Trace:
    """The live computation of ``subprogram`` on arguments of ``input_kinds``."""
    states = [(("in", k), kind) for k, kind in enumerate(input_kinds)]
    nodes = []
    for index, ins in enumerate(program.subprograms[subprogram]):
        n = len(states)
        (ref1, kind1), (ref2, kind2) = states[ins.in1 % n], states[ins.in2 % n]
        if prims.is_call(ins.op):
            body = trace(program, prims.callee(ins.op), (kind1, kind2))
            has_features = body.output is not None
            node = Node(index, ins.op, (ref1, ref2), prims.F, branches=ins.branches, body=body) \
                if has_features else None
        else:
            prim = prims.get(ins.op)
            kinds = (kind1, kind2)[:prim.arity]
            kind = prims.out_kind(ins.op, kinds)
            node = None if kind is None else Node(
                index, ins.op, (ref1, ref2)[:prim.arity], kind,
                const=float(program.constants[ins.const]) if prim.const else None,
                dim=int(program.dims[ins.dim]) if prim.dim else None,
                branches=ins.branches if prim.params else 1)
        if node is None:  # the inputs do not fit the op: the first passes through
            states.append((ref1, kind1))
        else:
            nodes.append(node)
            states.append((("node", len(nodes) - 1), node.kind))
    output = next((ref for ref, kind in reversed(states) if kind == prims.F), None)
    return _live(Trace(subprogram, tuple(nodes), output))


def _live(tr: Trace) -> Trace:
    """Dead-code elimination: only the nodes the output depends on, renumbered."""
    if tr.output is None:
        return tr
    needed = set()
    stack = [tr.output]
    while stack:
        kind, n = stack.pop()
        if kind == "node" and n not in needed:
            needed.add(n)
            stack.extend(tr.nodes[n].inputs)
    order = sorted(needed)
    renumber = {old: new for new, old in enumerate(order)}

    def ref(r):
        return ("node", renumber[r[1]]) if r[0] == "node" else r

    nodes = tuple(dataclasses.replace(tr.nodes[n], inputs=tuple(ref(r) for r in tr.nodes[n].inputs))
                  for n in order)
    return Trace(tr.subprogram, nodes, ref(tr.output))


def canonical(tr: Trace) -> str:
    """The trace as text without positions or dead fields: equal texts, the same computation."""
    def ref(r):
        return f"a{r[1]}" if r[0] == "in" else f"n{r[1]}"

    lines = []
    for n, node in enumerate(tr.nodes):
        fields = [ref(r) for r in node.inputs]
        if node.const is not None:
            fields.append(repr(node.const))
        if node.dim is not None:
            fields.append(f"d{node.dim}")
        if node.branches != 1:
            fields.append(f"x{node.branches}")
        op = f"call[{canonical(node.body)}]" if node.body is not None else node.op
        lines.append(f"n{n}={op}({','.join(fields)})")
    return ";".join(lines) + f";->{ref(tr.output) if tr.output else 'none'}"


def key(program: Program) -> str:
    """A stable hash of the canonical form of the block (dead code, unread fields and positions removed)."""
    return hashlib.sha256(canonical(trace(program)).encode()).hexdigest()[:16]


# --- JSON ---------------------------------------------------------------------------------------------------

def _body(program: Program) -> dict:
    return {"subprograms": [[dataclasses.asdict(ins) for ins in sub] for sub in program.subprograms],
            "constants": [float(c) for c in program.constants], "dims": [int(d) for d in program.dims]}


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def to_json(program: Program) -> dict:
    """``{"format", "subprograms", "constants", "dims", "checksum"}``; ``from_json`` rebuilds it exactly."""
    body = _body(program)
    return {"format": FORMAT, **body, "checksum": _checksum(body)}


def from_json(data) -> Program:
    """A program from ``to_json``'s object (or its JSON text); a malformed or edited one raises in one line."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"Program JSON does not parse ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"Not an effjax program: expected an object with format {FORMAT!r}.")
    fields = {f.name for f in dataclasses.fields(Instruction)}
    try:
        subs = tuple(tuple(Instruction(**{k: (str(v) if k == "op" else int(v)) for k, v in ins.items()
                                          if k in fields})
                           for ins in sub) for sub in data["subprograms"])
        if any(set(ins) - fields or "op" not in ins for sub in data["subprograms"] for ins in sub):
            raise ValueError("unknown or missing instruction fields")
        program = Program(subs, tuple(float(c) for c in data["constants"]), tuple(int(d) for d in data["dims"]))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"Malformed program JSON ({type(err).__name__}: {err}); write it with "
                         "effjax.search.program.to_json.") from None
    except ValueError as err:
        raise ValueError(f"Malformed program JSON: {err}") from None
    if data.get("checksum") != _checksum(_body(program)):
        raise ValueError("Program JSON checksum does not match its contents (edited by hand or damaged); "
                         "rebuild it with effjax.search.program.to_json.")
    return program


def load(value) -> Program:
    """A Program from a Program, its JSON object or text, or the path of a .json file holding it."""
    if isinstance(value, Program):
        return value
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        try:
            with open(value) as f:
                value = f.read()
        except OSError as err:
            raise ValueError(f"model.program={value!r} is neither program JSON nor a readable file ({err.strerror})"
                             "; pass a path written by effjax.search (best.json) or the JSON itself.") from None
    return from_json(value)


# --- reading ------------------------------------------------------------------------------------------------

def _line(program: Program, ins: Instruction, n: int) -> str:
    a, b = f"h{ins.in1 % n}", f"h{ins.in2 % n}"
    if prims.is_call(ins.op):
        copies = f" x{ins.branches}" if ins.branches > 1 else ""
        return f"s{prims.callee(ins.op)}({a}, {b}){copies}"
    prim = prims.get(ins.op)
    args = [a, b][:prim.arity]
    if prim.const:
        args.append(f"{program.constants[ins.const]:.4g}")
    if prim.dim:
        args.append(f"dim={program.dims[ins.dim]}")
    if prim.params and ins.branches > 1:
        args.append(f"x{ins.branches}")
    return f"{ins.op}({', '.join(args)})"


def listing(program: Program) -> str:
    """Python-like text of every subprogram (Primer App. A's listings); dead instructions end in '# dead'."""
    live = _live_positions(program)
    out = []
    for s, sub in enumerate(program.subprograms):
        inputs = "h0" if s == 0 else "h0, h1"
        out.append(f"def {'block' if s == 0 else f's{s}'}({inputs}):")
        first = 1 if s == 0 else 2
        for i, ins in enumerate(sub):
            dead = "" if (s, i) in live else "  # dead"
            out.append(f"    h{first + i} = {_line(program, ins, first + i)}{dead}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _live_positions(program: Program) -> set:
    found = set()

    def walk(tr):
        for node in tr.nodes:
            found.add((tr.subprogram, node.index))
            if node.body is not None:
                walk(node.body)

    walk(trace(program))
    return found

"""The primitive vocabulary of program search (Primer, So et al. 2021, Appendix A.1, as ``search.md`` §1.2
lists it), plus ``layer_norm`` and ``softmax`` as single primitives (the issue's "normalisation" and "softmax
attention over registers"; Primer builds them from z-score and exp/mask/sum/divide, which the vocabulary can
still do).

A program's hidden states are ``[batch, length, width]`` arrays of one of two kinds: ``F`` (features of each
position) and ``S`` (scores of each query position over the key positions, width = length), made only by
``t_matmul``. Causality holds by construction: ``t_matmul`` zeroes the scores of future keys, so any later
entry for a future key is a constant; ``matmul`` (scores x features) sums over past keys only; length mixing
(convolutions, cumulative ops) looks only backwards. Reductions are over the width.

An instruction whose inputs do not fit its op (``KINDS``) outputs its first input unchanged, so every program
is valid. The safe forms Primer used: ``log`` is log|x|, ``abs_root`` sqrt|x|, ``recip`` and ``div`` give 0
where the divisor is 0.
"""

import dataclasses

import jax
import jax.numpy as jnp

F, S = "F", "S"

# Relative dimensions (Primer App. A.1): widths are dim x unit, with unit = embed_dim / 16 by default, so the
# Transformer's widths (embed = 16, 4 x embed = 64, a 64-wide head of a 512 model = 2) are in the vocabulary.
DIMS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
BRANCHES = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Primitive:
    """``arity``: inputs read (1 or 2); ``const``/``dim``: reads the instruction's constant / relative dim;
    ``params``: owns parameters (and may run in branches); ``kinds``: the input kinds it accepts, in order
    (``'*'`` any); ``out``: the output kind (``'='`` the first input's)."""

    name: str
    arity: int
    kinds: tuple
    out: str = "="
    const: bool = False
    dim: bool = False
    params: bool = False
    fn: object = None


def _safe_div(x, y):
    ok = y != 0
    return jnp.where(ok, x / jnp.where(ok, y, 1.0), 0.0)


def _future(length: int):
    """[length, length] True where the key (column) is after the query (row)."""
    return jnp.arange(length)[None, :] > jnp.arange(length)[:, None]


def t_matmul(a, b):
    """Scores ``a b^T`` with future keys zeroed: [b, L, w] x [b, L, w] -> [b, L, L]."""
    scores = jnp.einsum("bqd,bkd->bqk", a, b)
    return jnp.where(_future(a.shape[1]), 0.0, scores)


def matmul(scores, values):
    """``scores @ values`` over past and present keys only: [b, L, L] x [b, L, w] -> [b, L, w]."""
    return jnp.einsum("bqk,bkd->bqd", jnp.where(_future(scores.shape[1]), 0.0, scores), values)


def softmax(x, kind: str):
    """Over the width; on scores the future keys are masked out (causal attention weights)."""
    if kind == S:
        x = jnp.where(_future(x.shape[1]), -jnp.inf, x)
    return jax.nn.softmax(x, axis=-1)


def mask(x):
    """Scores with the future keys set to 0 (Primer's MASK, applied after EXP in its softmax)."""
    return jnp.where(_future(x.shape[1]), 0.0, x)


def _unary(name, fn):
    return Primitive(name, 1, ("*",), fn=lambda a, b, c: fn(a))


def _binary(name, fn):
    return Primitive(name, 2, ("*", "="), fn=lambda a, b, c: fn(a, b))


_LIST = [
    _binary("add", jnp.add), _binary("sub", jnp.subtract), _binary("mul", jnp.multiply),
    _binary("div", _safe_div), _binary("max", jnp.maximum), _binary("min", jnp.minimum),
    _unary("abs_root", lambda x: jnp.sqrt(jnp.abs(x))), _unary("square", jnp.square),
    _unary("exp", jnp.exp), _unary("log", lambda x: jnp.log(jnp.abs(x) + 1e-30)), _unary("abs", jnp.abs),
    _unary("recip", lambda x: _safe_div(1.0, x)), _unary("sign", jnp.sign), _unary("cos", jnp.cos),
    _unary("sin", jnp.sin), _unary("tanh", jnp.tanh), _unary("sigmoid", lambda x: 1.0 / (1.0 + jnp.exp(-x))),
    _unary("relu", lambda x: jnp.maximum(x, 0.0)),
    Primitive("c_mul", 1, ("*",), const=True, fn=lambda a, b, c: a * c),
    Primitive("c_add", 1, ("*",), const=True, fn=lambda a, b, c: a + c),
    Primitive("c_max", 1, ("*",), const=True, fn=lambda a, b, c: jnp.maximum(a, c)),
    Primitive("red_mean", 1, ("*",), out=F, fn=lambda a, b, c: jnp.mean(a, -1, keepdims=True)),
    Primitive("red_sum", 1, ("*",), out=F, fn=lambda a, b, c: jnp.sum(a, -1, keepdims=True)),
    Primitive("red_max", 1, ("*",), out=F, fn=lambda a, b, c: jnp.max(a, -1, keepdims=True)),
    Primitive("red_min", 1, ("*",), out=F, fn=lambda a, b, c: jnp.min(a, -1, keepdims=True)),
    Primitive("t_matmul", 2, (F, F), out=S, fn=lambda a, b, c: t_matmul(a, b)),
    Primitive("matmul", 2, (S, F), out=F, fn=lambda a, b, c: matmul(a, b)),
    Primitive("softmax", 1, ("*",), fn=None),  # kind-dependent: the interpreter calls softmax(x, kind)
    Primitive("mask", 1, (S,), fn=lambda a, b, c: mask(a)),
    Primitive("cum_sum", 1, (F,), fn=lambda a, b, c: jnp.cumsum(a, axis=1)),
    Primitive("cum_prod", 1, (F,), fn=lambda a, b, c: jnp.cumprod(a, axis=1)),
    # Parametrised (the interpreter's Op module): dense = Primer's CONV 1X1; conv_k a causal conv over length to
    # dim x unit features; dconv_k a causal depthwise conv; scale / shift a learned per-feature multiplier /
    # offset; layer_norm with learned scale and bias (epsilon 1e-6, as the Backbone's).
    Primitive("dense", 1, (F,), out=F, dim=True, params=True),
    *[Primitive(f"conv{k}", 1, (F,), out=F, dim=True, params=True) for k in (3, 7, 15, 31)],
    *[Primitive(f"dconv{k}", 1, (F,), out=F, params=True) for k in (3, 7, 15, 31)],
    Primitive("scale", 1, (F,), out=F, params=True), Primitive("shift", 1, (F,), out=F, params=True),
    Primitive("layer_norm", 1, (F,), out=F, params=True),
]
PRIMITIVES = {p.name: p for p in _LIST}
CALL_PREFIX = "call:"  # an op 'call:j' runs subprogram j (j above the caller's index) on (in1, in2)


def get(op: str) -> Primitive:
    """The primitive ``op``; calls ('call:j') are not primitives."""
    if op not in PRIMITIVES:
        raise ValueError(f"Unknown program primitive {op!r}; known: {', '.join(PRIMITIVES)} (and 'call:<j>').")
    return PRIMITIVES[op]


def is_call(op: str) -> bool:
    return op.startswith(CALL_PREFIX)


def callee(op: str) -> int:
    return int(op[len(CALL_PREFIX):])


def conv_width(op: str) -> int:
    """The kernel width of 'conv7' / 'dconv3'."""
    return int(op.lstrip("d")[len("conv"):])


def out_kind(op: str, kinds: tuple) -> str | None:
    """The output kind of ``op`` on inputs of ``kinds``, or None when they do not fit (the instruction then
    passes its first input through)."""
    if is_call(op):
        return F
    prim = PRIMITIVES[op]
    for want, got in zip(prim.kinds, kinds, strict=False):
        if want == "=" and got != kinds[0]:
            return None
        if want not in ("*", "=") and want != got:
            return None
    return kinds[0] if prim.out == "=" else prim.out

"""Runs a ``Program`` as a linen layer: ``ProgramBlock`` is a decoder block the Backbone stacks (``model.program``).

The program is static Python data, so ``jit`` unrolls its trace (``program.trace``: live instructions only)
into one XLA graph. Parameters are named by instruction position (``i3``; a call's subprogram is a submodule
``i5`` with its own ``i0, i1...``), so a program always gives the same parameter tree; an instruction or call
running in ``branches`` copies holds its parameters with a leading branch axis (``nn.vmap``) and concatenates
the copies' outputs along the features. Widths are relative dims x ``unit`` (``embed_dim / 16`` by default).

Width rules (ours; Primer resolves mismatches automatically): a binary op broadcasts a width-1 input and
otherwise truncates or zero-pads its second input to the first's width; the block output is fitted to the
model width the same way.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.search import primitives as prims
from effjax.search import program as program_lib

dense_init = nn.initializers.xavier_uniform()


def fit_width(x, width: int):
    """``x [..., w]`` truncated or zero-padded to ``width`` features."""
    w = x.shape[-1]
    if w == width:
        return x
    if w > width:
        return x[..., :width]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - w)])


def causal_shifts(x, width: int):
    """``[width, batch, length, ...]``: x shifted down the length by 0, 1, ... width - 1 (zero-filled)."""
    length = x.shape[1]
    padded = jnp.pad(x, [(0, 0), (width - 1, 0)] + [(0, 0)] * (x.ndim - 2))
    return jnp.stack([padded[:, width - 1 - s: width - 1 - s + length] for s in range(width)])


def primer_taps(width: int):
    """Primer's depthwise-conv init (0.5 on the current position, 0.5 / width on each earlier one)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        taps = jnp.array([0.5] + [0.5 / width] * (width - 1), dtype)
        return jnp.broadcast_to(taps[:, None], shape)
    return init


class Op(nn.Module):
    """One parametrised primitive (``dense``, ``conv{k}``, ``dconv{k}``, ``scale``, ``shift``, ``layer_norm``)."""

    op: str
    features: int = 0  # output width of dense / conv

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if self.op == "dense":
            return nn.Dense(self.features, kernel_init=dense_init, name="dense")(x)
        if self.op.startswith("dconv"):
            k = prims.conv_width(self.op)
            kernel = self.param("kernel", primer_taps(k), (k, width), jnp.float32)
            return jnp.einsum("sblw,sw->blw", causal_shifts(x, k), kernel.astype(x.dtype))
        if self.op.startswith("conv"):
            k = prims.conv_width(self.op)
            kernel = self.param("kernel", dense_init, (k, width, self.features), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            return jnp.einsum("sblw,swf->blf", causal_shifts(x, k), kernel.astype(x.dtype)) + bias
        if self.op == "scale":
            return x * self.param("scale", nn.initializers.ones, (width,), jnp.float32)
        if self.op == "shift":
            return x + self.param("shift", nn.initializers.zeros, (width,), jnp.float32)
        if self.op == "layer_norm":
            return nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        raise ValueError(f"Op: {self.op!r} is not a parametrised primitive.")


def branched(module_cls, branches: int):
    """``module_cls`` run ``branches`` times on the same inputs with separate parameters (stacked on axis 0)."""
    if branches == 1:
        return module_cls
    return nn.vmap(module_cls, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                   out_axes=0, axis_size=branches)


def concat_branches(y, branches: int):
    """``[branches, batch, length, w]`` -> ``[batch, length, branches * w]`` (branch-major features)."""
    if branches == 1:
        return y
    return jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], branches * y.shape[-1])


class TraceModule(nn.Module):
    """Runs one traced subprogram on its arguments; returns its output state."""

    trace: program_lib.Trace
    unit: int

    @nn.compact
    def __call__(self, *args):
        values = []

        def get(ref):
            return args[ref[1]] if ref[0] == "in" else values[ref[1]]

        for node in self.trace.nodes:
            inputs = [get(ref) for ref in node.inputs]
            if node.body is not None:
                module = branched(TraceModule, node.branches)(node.body, self.unit, name=f"i{node.index}")
                y = concat_branches(module(*inputs), node.branches)
            elif prims.get(node.op).params:
                features = (node.dim or 0) * self.unit
                module = branched(Op, node.branches)(node.op, features, name=f"i{node.index}")
                y = concat_branches(module(inputs[0]), node.branches)
            else:
                y = self.primitive(node, inputs)
            values.append(y)
        return get(self.trace.output)

    def primitive(self, node, inputs):
        prim = prims.get(node.op)
        a = inputs[0]
        if node.op == "softmax":
            return prims.softmax(a, node.kind)
        b = inputs[1] if prim.arity == 2 else None
        if b is not None and node.op != "matmul" and b.shape[-1] != a.shape[-1] and 1 not in (a.shape[-1],
                                                                                              b.shape[-1]):
            b = fit_width(b, a.shape[-1])
        return prim.fn(a, b, node.const)


class ProgramBlock(nn.Module):
    """A decoder block computed by ``program`` (causal by construction, whatever ``causal`` says)."""

    program: program_lib.Program
    dim_unit: int = 0  # width of relative dim 1; 0: embed_dim / 16

    @nn.compact
    def __call__(self, x):
        embed = x.shape[-1]
        unit = self.dim_unit or embed // 16
        if not self.dim_unit and embed % 16:
            raise ValueError(f"model.program: embed_dim {embed} is not divisible by 16, so the relative dims "
                             "have no unit; use a multiple of 16 or set the dim unit.")
        tr = program_lib.trace(self.program)
        if tr.output is None:
            return x
        y = TraceModule(tr, unit, name="program")(x.astype(jnp.float32))
        return fit_width(y, embed).astype(x.dtype)


def leaks_future(block_apply, x, position: int, atol: float = 1e-5) -> bool:
    """Whether changing the inputs after ``position`` changes any output at or before it (on ``x [b, L, d]``)."""
    perturbed = x.at[:, position + 1:].add(jax.random.normal(jax.random.key(0), x[:, position + 1:].shape))
    before = block_apply(x)[:, :position + 1]
    after = block_apply(perturbed)[:, :position + 1]
    return not bool(jnp.allclose(before, after, atol=atol))

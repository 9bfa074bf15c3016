"""Reference programs: the Transformer decoder block (the search's seed, Primer's "conceptual initialisation"
split into concept subprograms) and Primer-EZ (squared ReLU + multi-dconv-head attention, So et al. 2021 §3).

``vanilla`` computes exactly the Backbone's pre-norm ``Block`` with ``activation='relu'`` and softmax
attention, and ``primer_ez`` the ``Block`` with ``activation='squared_relu'`` and ``attention='primer_mdha'``,
given the same weights: ``params_from_block`` maps a Block's params onto the program's. Subprograms: 0 the block
(norm, attention, residual, norm, feed-forward, residual), 1 multi-head attention (the heads as one call in
``num_heads`` branches, then the output projection), 2 one head, 3 the feed-forward. The attention projections
are biased ``dense`` primitives; the Block's have no bias, so ``params_from_block`` sets those biases to 0.
"""

import math

import numpy as np

from effjax.search.primitives import DIMS
from effjax.search.program import Instruction, Program

BLOCK, ATTENTION, HEAD, FEED_FORWARD = 0, 1, 2, 3


def _dims(embed_dim: int, num_heads: int, mlp_dim: int, unit: int):
    head_dim = embed_dim // num_heads
    rel = {"head": head_dim / unit, "mlp": mlp_dim / unit, "embed": embed_dim / unit}
    for name, value in rel.items():
        if value not in DIMS:
            raise ValueError(f"The seed program needs the {name} width ({int(value * unit)}) to be a relative dim "
                             f"{DIMS} times the unit {unit} (embed_dim / 16); pick embed_dim, num_heads and "
                             "mlp_dim that are.")
    return head_dim, (int(rel["head"]), int(rel["mlp"]), int(rel["embed"]))


def transformer(embed_dim: int, num_heads: int, mlp_dim: int, *, dconv: bool = False, squared: bool = False,
                unit: int = 0) -> Program:
    """The pre-norm decoder block as a program; ``dconv`` adds Primer's width-3 depthwise convs after the Q, K, V
    projections and ``squared`` squares the ReLU."""
    unit = unit or embed_dim // 16
    head_dim, dims = _dims(embed_dim, num_heads, mlp_dim, unit)
    head_d, mlp_d, embed_d = 0, 1, 2  # indices into the dim bank
    block = (Instruction("layer_norm", 0), Instruction(f"call:{ATTENTION}", 1, 1),
             Instruction("add", 0, 2), Instruction("layer_norm", 3),
             Instruction(f"call:{FEED_FORWARD}", 4, 4), Instruction("add", 3, 5))
    attention = (Instruction(f"call:{HEAD}", 0, 0, branches=num_heads), Instruction("dense", 2, dim=embed_d))
    if dconv:  # h2 q, h3 dconv(q), h4 k, h5 dconv(k), h6 v, h7 dconv(v)
        projections = tuple(ins for state in (2, 4, 6)
                            for ins in (Instruction("dense", 0, dim=head_d), Instruction("dconv3", state)))
        q, k, v = 3, 5, 7
    else:
        projections = tuple(Instruction("dense", 0, dim=head_d) for _ in range(3))
        q, k, v = 2, 3, 4
    n = 2 + len(projections)  # the next state index
    head = projections + (Instruction("t_matmul", q, k), Instruction("c_mul", n, const=0),
                          Instruction("softmax", n + 1), Instruction("matmul", n + 2, v))
    feed_forward = (Instruction("dense", 0, dim=mlp_d), Instruction("relu", 2))
    if squared:
        feed_forward += (Instruction("square", 3),)
    feed_forward += (Instruction("dense", len(feed_forward) + 1, dim=embed_d),)
    return Program((block, attention, head, feed_forward), constants=(1.0 / math.sqrt(head_dim),), dims=dims)


def vanilla(embed_dim: int, num_heads: int, mlp_dim: int, unit: int = 0) -> Program:
    """The Transformer block (ReLU feed-forward, softmax attention): the seed of program search."""
    return transformer(embed_dim, num_heads, mlp_dim, unit=unit)


def primer_ez(embed_dim: int, num_heads: int, mlp_dim: int, unit: int = 0) -> Program:
    """Primer-EZ: squared ReLU and a causal width-3 depthwise conv after each of Q, K, V."""
    return transformer(embed_dim, num_heads, mlp_dim, dconv=True, squared=True, unit=unit)


def params_from_block(block_params: dict, *, dconv: bool = False, squared: bool = False) -> dict:
    """The program's params holding a Backbone ``Block``'s weights (unboxed), for the same outputs."""
    att = block_params["attention"]
    heads = att["query"].shape[1]

    def per_head(kernel):  # [embed, heads, head_dim] -> [heads, embed, head_dim], zero bias
        kernel = np.moveaxis(np.asarray(kernel), 1, 0)
        return {"dense": {"kernel": kernel, "bias": np.zeros((heads, kernel.shape[-1]), kernel.dtype)}}

    if dconv:
        convs = att["Attention_0"]
        head = {}
        for slot, name in zip((0, 2, 4), ("query", "key", "value"), strict=True):
            head[f"i{slot}"] = per_head(att[name])
            head[f"i{slot + 1}"] = {"kernel": np.moveaxis(np.asarray(convs[f"{name[0]}_dconv"]), 1, 0)}
    else:
        head = {f"i{slot}": per_head(att[name]) for slot, name in enumerate(("query", "key", "value"))}
    out = np.asarray(att["out"])
    attention = {"i0": head, "i1": {"dense": {"kernel": out.reshape(-1, out.shape[-1]),
                                              "bias": np.zeros(out.shape[-1], out.dtype)}}}
    last = 3 if squared else 2
    mlp = block_params["mlp"]
    feed_forward = {"i0": {"dense": dict(mlp["wi"])}, f"i{last}": {"dense": dict(mlp["wo"])}}
    norm = lambda name: {"norm": dict(block_params[name]["layer_norm"])}  # noqa: E731
    return {"program": {"i0": norm("ln_attention"), "i1": attention, "i3": norm("ln_mlp"), "i4": feed_forward}}

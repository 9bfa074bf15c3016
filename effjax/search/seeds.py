"""Reference programs: the Transformer decoder block (the search's seed, Primer's "conceptual initialisation"
split into concept subprograms), Primer-EZ (squared ReLU + multi-dconv-head attention, So et al. 2021 §3) and full
Primer (Primer-EZ + the shared Q/K depthwise representation + the pre/post-norm layout + Primer's norm).

``vanilla`` computes exactly the Backbone's pre-norm ``Block`` with ``activation='relu'`` and softmax
attention, and ``primer_ez`` the ``Block`` with ``activation='squared_relu'`` and ``attention='primer_mdha'``,
given the same weights: ``params_from_block`` maps a Block's params onto the program's. Subprograms: 0 the block
(norm, attention, residual, norm, feed-forward, residual), 1 multi-head attention (the heads as one call in
``num_heads`` branches, then the output projection), 2 one head, 3 the feed-forward. The attention projections
are biased ``dense`` primitives; the Block's have no bias, so ``params_from_block`` sets those biases to 0.

``primer`` is the Block with ``norm='primer'``, ``norm_layout='pre_post'``, ``activation='squared_relu'`` and
``primer_mdha`` with ``share_qk=True``, within these departures: the block is layer_norm, attention, residual,
feed-forward, layer_norm, residual (the feed-forward's norm on its output); Primer's norm is the ``layer_norm``
primitive (algebraically equal: ``mean(x (x - mean)) = mean((x - mean)^2)``); a head is ``r = dense(x)``,
``K = dconv3(r)``, ``Q = dense(K)``, ``V = dconv3(dense(x))``. The heads are independent branches, so the
program's q_solo is per head (``head_dim -> head_dim``), where the built-in (as Primer's code) has one matrix over
all heads x head_dim; ``params_from_block(..., primer=True)`` maps a built-in q_solo only when it is
block-diagonal (zero across heads), and the program then computes the Block's output exactly.
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
                shared_qk: bool = False, pre_post: bool = False, unit: int = 0) -> Program:
    """The pre-norm decoder block as a program; ``dconv`` adds Primer's width-3 depthwise convs after the Q, K, V
    projections and ``squared`` squares the ReLU. ``shared_qk`` (with ``dconv``) makes K one depthwise-convolved
    projection and Q a per-head dense of it; ``pre_post`` normalises the feed-forward's output instead of its
    input."""
    unit = unit or embed_dim // 16
    head_dim, dims = _dims(embed_dim, num_heads, mlp_dim, unit)
    head_d, mlp_d, embed_d = 0, 1, 2  # indices into the dim bank
    if pre_post:  # h1 norm, h2 attention, h3 residual, h4 feed-forward, h5 its norm, h6 residual
        block = (Instruction("layer_norm", 0), Instruction(f"call:{ATTENTION}", 1, 1),
                 Instruction("add", 0, 2), Instruction(f"call:{FEED_FORWARD}", 3, 3),
                 Instruction("layer_norm", 4), Instruction("add", 3, 5))
    else:
        block = (Instruction("layer_norm", 0), Instruction(f"call:{ATTENTION}", 1, 1),
                 Instruction("add", 0, 2), Instruction("layer_norm", 3),
                 Instruction(f"call:{FEED_FORWARD}", 4, 4), Instruction("add", 3, 5))
    attention = (Instruction(f"call:{HEAD}", 0, 0, branches=num_heads), Instruction("dense", 2, dim=embed_d))
    if shared_qk:  # h2 r, h3 dconv(r) = k, h4 q_solo(k) = q, h5 v, h6 dconv(v)
        projections = (Instruction("dense", 0, dim=head_d), Instruction("dconv3", 2),
                       Instruction("dense", 3, dim=head_d), Instruction("dense", 0, dim=head_d),
                       Instruction("dconv3", 5))
        q, k, v = 4, 3, 6
    elif dconv:  # h2 q, h3 dconv(q), h4 k, h5 dconv(k), h6 v, h7 dconv(v)
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


def primer(embed_dim: int, num_heads: int, mlp_dim: int, unit: int = 0) -> Program:
    """Full Primer: Primer-EZ with the shared Q/K depthwise representation (a per-head q_solo) and the
    feed-forward's norm on its output (pre/post-norm layout); the module docstring lists the departures."""
    return transformer(embed_dim, num_heads, mlp_dim, dconv=True, squared=True, shared_qk=True, pre_post=True,
                       unit=unit)


def _per_head_q_solo(q_solo) -> np.ndarray:
    """``[heads, head_dim, heads, head_dim]`` -> the per-head ``[heads, head_dim, head_dim]`` blocks; ValueError when
    the matrix mixes heads, which the program's independent head branches cannot."""
    q_solo = np.asarray(q_solo)
    heads = q_solo.shape[0]
    blocks = np.stack([q_solo[h, :, h, :] for h in range(heads)])
    across = q_solo.copy()
    for h in range(heads):
        across[h, :, h, :] = 0
    if np.any(across):
        raise ValueError("The Primer program's q_solo is per head, but this Block's q_solo mixes heads (max "
                         f"|entry| across heads {np.abs(across).max():.3g}); zero it across heads to map it.")
    return blocks


def params_from_block(block_params: dict, *, dconv: bool = False, squared: bool = False,
                      primer: bool = False) -> dict:
    """The program's params holding a Backbone ``Block``'s weights (unboxed), for the same outputs.

    ``primer=True`` maps the full-Primer Block (shared Q/K, ``norm_layout='pre_post'``, Primer's norm, squared ReLU)
    onto ``primer(...)``; its q_solo must be block-diagonal (``_per_head_q_solo``).
    """
    att = block_params["attention"]
    heads = att["query"].shape[1]
    squared = squared or primer

    def dense(kernel):  # [heads, in, out] per head, zero bias
        kernel = np.asarray(kernel)
        return {"dense": {"kernel": kernel, "bias": np.zeros((heads, kernel.shape[-1]), kernel.dtype)}}

    def per_head(kernel):  # [embed, heads, head_dim] -> [heads, embed, head_dim]
        return dense(np.moveaxis(np.asarray(kernel), 1, 0))

    def conv(kernel):  # [3, heads, head_dim] -> [heads, 3, head_dim]
        return {"kernel": np.moveaxis(np.asarray(kernel), 1, 0)}

    if primer:
        convs = att["Attention_0"]
        head = {"i0": per_head(att["query"]), "i1": conv(convs["qk_dconv"]),
                "i2": dense(_per_head_q_solo(convs["q_solo"])), "i3": per_head(att["value"]),
                "i4": conv(convs["v_dconv"])}
    elif dconv:
        convs = att["Attention_0"]
        head = {}
        for slot, name in zip((0, 2, 4), ("query", "key", "value"), strict=True):
            head[f"i{slot}"] = per_head(att[name])
            head[f"i{slot + 1}"] = conv(convs[f"{name[0]}_dconv"])
    else:
        head = {f"i{slot}": per_head(att[name]) for slot, name in enumerate(("query", "key", "value"))}
    out = np.asarray(att["out"])
    attention = {"i0": head, "i1": {"dense": {"kernel": out.reshape(-1, out.shape[-1]),
                                              "bias": np.zeros(out.shape[-1], out.dtype)}}}
    last = 3 if squared else 2
    mlp = block_params["mlp"]
    feed_forward = {"i0": {"dense": dict(mlp["wi"])}, f"i{last}": {"dense": dict(mlp["wo"])}}

    def norm(name):  # LayerNorm's or Primer's norm: both hold scale and bias
        params = block_params[name]
        return {"norm": dict(params["primer_norm"] if "primer_norm" in params else params["layer_norm"])}

    if primer:  # pre/post layout: i3 the feed-forward, i4 its norm
        return {"program": {"i0": norm("ln_attention"), "i1": attention, "i3": feed_forward, "i4": norm("ln_mlp")}}
    return {"program": {"i0": norm("ln_attention"), "i1": attention, "i3": norm("ln_mlp"), "i4": feed_forward}}

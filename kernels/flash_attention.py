"""Flash softmax attention in Pallas: FlashAttention-2 (Dao 2023, Alg. 1 and 2), online softmax over key blocks.

``flash_attention(q, k, v, *, mask, segment_ids, causal, window)`` computes what
``effjax.attention.softmax.attend`` (with ``window``: ``sliding_window.attend``) computes, in
O(length) memory, forward and backward (custom VJP; the backward is two Pallas kernels, dQ and dK/dV).

One mechanism serves every pattern, block-sparse attention (``kernels/block_sparse.py``) included:
a boolean *tile layout* [heads or 1, q_blocks, k_blocks] says which key blocks each query block
visits. The forward and dQ kernels loop over a query block's row of the layout, the dK/dV kernel over
a key block's column. A row (column) is given either as a range (first block, count): causal and
sliding-window layouts, whose blocks outside the band are never loaded, or as a table of block
indices (arbitrary block-sparse layouts). Token-level masks (key padding, segments, causal, window)
are applied inside the visited blocks, and so is attention dropout (``kernels/dropout.py``: a keep bit
hashed from a seed and the element's coordinates, recomputed by the backward kernels).
With ``global_tokens`` (Longformer, through
``block_sparse.window_global_attention``) the window condition becomes
``|i - j| <= window or global[i] or global[j]``, the flags passed per batch row like the key mask.

Masked logits get float32's most negative value, as in the reference, so a query with no allowed key
returns the uniform average of the values of the key blocks it visits (the reference: of all keys;
the two agree unless blocks are skipped). Padding added to reach a multiple of the block is excluded
exactly (-inf). A query block that visits no key block returns zeros.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels import dropout, sharding, tuning
from effjax.kernels.backend import interpret_default

NAME = "flash_attention"
MASKED = float(np.finfo(np.float32).min)  # what the reference writes into masked logits
LOG2E = math.log2(math.e)  # the kernels use exp2: e^x = 2^(x log2 e)
_FAR = 1 << 40  # "unbounded" distance for tile-layout arithmetic


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block sizes of the forward (``block_q``, ``block_k``) and backward (``*_bwd``) kernels."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int


# Defaults per backend. GPU: FlashAttention-2's Triton choices (128 x 64 forward, 64 x 64 backward),
# not yet tuned on this project's H100/H200 (see kernels/README.md). CPU (interpret mode): few grid
# steps matter more than tile size.
DEFAULT_BLOCKS = {
    "gpu": BlockSizes(128, 64, 64, 64),
    "cpu": BlockSizes(64, 64, 64, 64),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one attention call (hashable: a custom_vjp non-differentiable argument)."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    causal: bool
    window: int | None
    sm_scale: float
    groups: int  # query heads per key/value head (GQA/MQA)
    has_mask: bool
    has_segments: bool
    has_global: bool  # window widened by global tokens: band | global query | global key
    dropout_keep_from: int  # attention dropout: keep where the hash >= this (0: no dropout)
    dropout_scale: float  # 1 / (1 - rate)
    heads_total: int  # query heads of the whole call (a shard may hold fewer): the dropout stream index
    layout_heads: int  # 1, or the number of query heads when the layout differs per head
    fwd_mode: str  # "range" | "table" for each of the three visit lists
    dq_mode: str
    dkv_mode: str
    interpret: bool
    num_warps: int | None
    num_stages: int | None


# ----------------------------------------------------------------------------------------------------
# Checks and tile layouts (host side, static shapes).


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def check_shapes(method: str, q, k, v) -> None:
    """[batch, length, heads, head_dim] q, k, v that agree (kv heads dividing q heads), one float32/bfloat16 dtype."""
    for label, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{method}: {label} must have shape [batch, length, heads, head_dim], got {x.shape}.")
    if k.shape != v.shape:
        raise ValueError(f"{method}: k and v shapes differ: {k.shape} vs {v.shape}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{method}: q {q.shape} and k {k.shape} must agree in batch and head_dim.")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{method}: key/value heads ({k.shape[2]}) must divide query heads ({q.shape[2]}) for GQA.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{method}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{method}: dtype must be float32 or bfloat16, got {q.dtype}.")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"{method}: empty sequence (q_len {q.shape[1]}, kv_len {k.shape[1]}).")


def check_inputs(method: str, q, k, v, interpret: bool) -> int:
    """Validates q, k, v for the Triton kernels (``check_shapes``, a power-of-two head_dim); returns the GQA group
    size."""
    check_shapes(method, q, k, v)
    head_dim = q.shape[3]
    low = 1 if interpret else 16
    if not (_is_pow2(head_dim) and low <= head_dim <= 256):
        raise ValueError(
            f"{method}: head_dim must be a power of two in [{low}, 256] (64 and 128 are the tuned ones"
            f"{'' if interpret else '; smaller ones run in interpret mode only'}), got {head_dim}.")
    return q.shape[2] // k.shape[2]


def check_block(method: str, name: str, block: int, length: int, interpret: bool) -> int:
    """``block`` validated (a power of two, >= 16 when compiled) and clamped to the length rounded up."""
    low = 1 if interpret else 16
    if not (_is_pow2(block) and block >= low):
        raise ValueError(f"{method}: {name} must be a power of two >= {low}, got {block}.")
    return min(block, max(low, pl.next_power_of_2(length)))


def band_layout(q_len: int, kv_len: int, block_q: int, block_k: int, causal: bool, window: int | None):
    """numpy bool [1, q_blocks, k_blocks]: tiles holding at least one pair allowed by causal and window.

    Query i (aligned to the end: i + kv_len - q_len) may see keys [i + off - left, i + off + right].
    """
    off = kv_len - q_len
    left = _FAR if window is None else window
    right = 0 if causal else (_FAR if window is None else window)
    qa = np.arange(0, q_len, block_q, dtype=np.int64)
    qb = np.minimum(qa + block_q, q_len) - 1
    ka = np.arange(0, kv_len, block_k, dtype=np.int64)
    kb = np.minimum(ka + block_k, kv_len) - 1
    lo, hi = qa + off - left, qb + off + right
    return ((lo[:, None] <= kb[None, :]) & (hi[:, None] >= ka[None, :]))[None]


def _contiguous(layout: np.ndarray) -> bool:
    count = layout.sum(-1)
    first = layout.argmax(-1)
    last = layout.shape[-1] - 1 - layout[..., ::-1].argmax(-1)
    return bool(np.all((count == 0) | (last - first + 1 == count)))


def visit_lists(layout):
    """(mode, first, count) for each row of a [H, n, m] layout: the blocks a row visits, in order.

    ``range``: the row's blocks are first..first+count-1 (``first`` int32 [H, n]). ``table``: ``first``
    is int32 [H, n, W] listing them (W = the longest row; all m when the layout is traced).
    """
    if isinstance(layout, np.ndarray):
        count = layout.sum(-1).astype(np.int32)
        if _contiguous(layout):
            return "range", jnp.asarray(layout.argmax(-1).astype(np.int32)), jnp.asarray(count)
        width = max(int(count.max()), 1)
        order = np.argsort(~layout, axis=-1, kind="stable")[..., :width].astype(np.int32)
        return "table", jnp.asarray(order), jnp.asarray(count)
    layout = jnp.asarray(layout, bool)
    order = jnp.argsort(~layout, axis=-1, stable=True).astype(jnp.int32)
    return "table", order, layout.sum(-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Kernels. Refs arrive in the order of ``names``; index maps follow the grid (block, batch, head).


def _visit(refs, prefix, mode, head, row):
    """(count, block_at): how many blocks row ``row`` visits, and the t-th one."""
    count = refs[prefix + "_count"][head, row]
    first = refs[prefix + "_first"]
    if mode == "range":
        start = first[head, row]
        return count, lambda t: start + t
    return count, lambda t: first[head, row, t]


def _q_tokens(refs, q_start, bq):
    """The query-side token arrays (segment ids, global flags) of the query block at ``q_start``."""
    return {name: refs[name][pl.ds(q_start, bq)] for name in ("seg_q", "glob_q") if name in refs}


def _logits(cfg, q, k, q_start, k_start, bq, bk, refs, q_tok=None):
    """Scaled logits (base 2) of a [bq, bk] tile with every token-level mask applied.

    ``q_tok``: ``_q_tokens`` of the query block when the caller loaded them once for many tiles.
    """
    s = plgpu.dot(q, k, trans_b=True) * (cfg.sm_scale * LOG2E)
    q_tok = _q_tokens(refs, q_start, bq) if q_tok is None else q_tok
    q_pos = q_start + jnp.arange(bq)[:, None] + (cfg.kv_len - cfg.q_len)
    k_pos = k_start + jnp.arange(bk)[None, :]
    allowed = None

    def conj(a, b):
        return b if a is None else a & b

    if cfg.causal:
        allowed = conj(allowed, q_pos >= k_pos)
    if cfg.window is not None:
        near = jnp.abs(q_pos - k_pos) <= cfg.window
        if cfg.has_global:  # Longformer: global queries see every key, every query sees global keys
            near = near | (q_tok["glob_q"][:, None] != 0) | (refs["glob_k"][pl.ds(k_start, bk)][None, :] != 0)
        allowed = conj(allowed, near)
    if cfg.has_mask:
        allowed = conj(allowed, refs["kmask"][pl.ds(k_start, bk)][None, :] != 0)
    if cfg.has_segments:
        allowed = conj(allowed, q_tok["seg_q"][:, None] == refs["seg_k"][pl.ds(k_start, bk)][None, :])
    if allowed is not None:
        s = jnp.where(allowed, s, MASKED)
    if cfg.kv_len % bk:  # keys added to fill the last block are excluded exactly
        s = jnp.where(k_pos < cfg.kv_len, s, -jnp.inf)
    return s, allowed


def _dropout_key(cfg, refs):
    """This program's dropout stream key (None without dropout); grid axes 1 and 2 are batch and head.

    ``seed`` is [seed0, seed1, batch offset, head offset]: the offsets of this shard under a mesh, so the
    keep bits are those of the unsharded call. Read at the kernel's top level: interpret mode resolves
    ``program_id`` only there, not inside loops.
    """
    if not cfg.dropout_keep_from:
        return None
    seed = refs["seed"]
    batch_head = (pl.program_id(1) + seed[2]) * cfg.heads_total + pl.program_id(2) + seed[3]
    return dropout.stream_key((seed[0], seed[1]), batch_head)


def _keep(cfg, key, q_start, k_start, bq, bk):
    """The dropout keep mask of a [bq, bk] tile (None without dropout)."""
    if key is None:
        return None
    return dropout.keep_bits(key, q_start + jnp.arange(bq)[:, None], k_start + jnp.arange(bk)[None, :], cfg.kv_len,
                             cfg.dropout_keep_from)


def _dropped(cfg, keep, x):
    """``x`` with dropped entries zeroed and kept ones scaled by 1 / (1 - rate); ``x`` itself without dropout."""
    return x if keep is None else jnp.where(keep, x * cfg.dropout_scale, 0.0)


def _fwd_kernel(*refs, names, cfg):
    refs = dict(zip(names, refs, strict=True))
    qi, h = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q = refs["q"][...]
    q_start = qi * bq
    q_tok = _q_tokens(refs, q_start, bq)
    count, block_at = _visit(refs, "fwd", cfg.fwd_mode, h if cfg.layout_heads > 1 else 0, qi)
    key = _dropout_key(cfg, refs)

    def body(t, carry):
        acc, m, row_sum = carry
        k_start = pl.multiple_of(block_at(t) * bk, bk)
        k = refs["k"][pl.ds(k_start, bk), :]
        v = refs["v"][pl.ds(k_start, bk), :]
        s, _ = _logits(cfg, q, k, q_start, k_start, bq, bk, refs, q_tok)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        row_sum = alpha * row_sum + p.sum(axis=-1)
        p = _dropped(cfg, _keep(cfg, key, q_start, k_start, bq, bk), p)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, row_sum

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, row_sum = lax.fori_loop(0, count, body, init)
    refs["o"][...] = (acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]).astype(refs["o"].dtype)
    refs["m"][...] = m
    refs["row_sum"][...] = row_sum


def _probs(s, m, row_sum):
    """Softmax probabilities of a tile from the forward's row max ``m`` (base 2) and sum ``row_sum``."""
    return jnp.exp2(s - m[:, None]) * (1.0 / jnp.where(row_sum > 0, row_sum, 1.0))[:, None]


def _ds(p, dp, delta, allowed):
    """dL/dlogits = p (dp - delta); zero where masked (matters only for rows with no allowed key)."""
    ds = p * (dp - delta[:, None])
    return ds if allowed is None else jnp.where(allowed, ds, 0.0)


def _dq_kernel(*refs, names, cfg):
    refs = dict(zip(names, refs, strict=True))
    qi, h = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    q, do = refs["q"][...], refs["do"][...]
    m, row_sum, delta = refs["m"][...], refs["row_sum"][...], refs["delta"][...]
    q_start = qi * bq
    q_tok = _q_tokens(refs, q_start, bq)
    count, block_at = _visit(refs, "dq", cfg.dq_mode, h if cfg.layout_heads > 1 else 0, qi)
    key = _dropout_key(cfg, refs)

    def body(t, dq):
        k_start = pl.multiple_of(block_at(t) * bk, bk)
        k = refs["k"][pl.ds(k_start, bk), :]
        v = refs["v"][pl.ds(k_start, bk), :]
        s, allowed = _logits(cfg, q, k, q_start, k_start, bq, bk, refs, q_tok)
        p = _probs(s, m, row_sum)
        dp = _dropped(cfg, _keep(cfg, key, q_start, k_start, bq, bk), plgpu.dot(do, v, trans_b=True))
        ds = _ds(p, dp, delta, allowed)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    refs["dq"][...] = (dq * cfg.sm_scale).astype(refs["dq"].dtype)


def _dkv_kernel(*refs, names, cfg):
    refs = dict(zip(names, refs, strict=True))
    kj, h = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    k, v = refs["k"][...], refs["v"][...]
    k_start = kj * bk
    count, block_at = _visit(refs, "dkv", cfg.dkv_mode, h if cfg.layout_heads > 1 else 0, kj)
    key = _dropout_key(cfg, refs)

    def body(t, carry):
        dk, dv = carry
        q_start = pl.multiple_of(block_at(t) * bq, bq)
        rows = pl.ds(q_start, bq)
        q, do = refs["q"][rows, :], refs["do"][rows, :]
        m, row_sum, delta = refs["m"][rows], refs["row_sum"][rows], refs["delta"][rows]
        s, allowed = _logits(cfg, q, k, q_start, k_start, bq, bk, refs)
        p = _probs(s, m, row_sum)
        keep = _keep(cfg, key, q_start, k_start, bq, bk)
        dv = dv + plgpu.dot(_dropped(cfg, keep, p).astype(do.dtype), do, trans_a=True)
        ds = _ds(p, _dropped(cfg, keep, plgpu.dot(do, v, trans_b=True)), delta, allowed)
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, count, body, (zeros, zeros))
    refs["dk"][...] = (dk * cfg.sm_scale).astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)


# ----------------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid (block, batch, head); q-side arrays are [B, Lq_pad, H, D], k-side
# [B, Lk_pad, H // groups, D], row statistics [B, H, Lq_pad] float32.


def _whole(x):
    """BlockSpec handing every program the whole (small) array."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _compiler_params(cfg, head_dim):
    warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages or 2)


def _extras(tokens):
    """(name, array, spec) of the per-batch int32 token arrays [batch, padded length], each given whole per row,
    and of the dropout seed (uint32 [4]: seed and shard offsets, given whole).

    ``tokens`` maps the names the kernels read (kmask, seg_q, seg_k, glob_q, glob_k, seed) to those present.
    """
    return [(name, a, _whole(a) if name == "seed" else pl.BlockSpec((None, a.shape[1]), lambda i, b, h: (b, 0)))
            for name, a in tokens.items()]


def _call(kernel, cfg, grid, inputs, outputs, head_dim, name):
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    return pl.pallas_call(
        functools.partial(kernel, names=names, cfg=cfg),
        grid=grid,
        in_specs=[s for _, _, s in inputs],
        out_specs=[s for _, _, s in outputs],
        out_shape=[a for _, a, _ in outputs],
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret,
        name=name,
    )(*(a for _, a, _ in inputs))


def _forward(cfg, q, k, v, tokens, visits):
    batch, lq, heads, d = q.shape
    g, bq = cfg.groups, cfg.block_q
    kv_spec = pl.BlockSpec((None, k.shape[1], None, d), lambda i, b, h: (b, 0, h // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    inputs = [("q", q, pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))),
              ("k", k, kv_spec), ("v", v, kv_spec), *_extras(tokens),
              ("fwd_first", visits[0], _whole(visits[0])), ("fwd_count", visits[1], _whole(visits[1]))]
    stats = jax.ShapeDtypeStruct((batch, heads, lq), jnp.float32)
    outputs = [("o", jax.ShapeDtypeStruct(q.shape, q.dtype), inputs[0][2]), ("m", stats, row_spec),
               ("row_sum", stats, row_spec)]
    return _call(_fwd_kernel, cfg, (lq // bq, batch, heads), inputs, outputs, d, "flash_attention_fwd")


def _backward(cfg, q, k, v, tokens, dq_visits, dkv_visits, o, m, row_sum, do):
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    g, bq, bk = cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    extras = _extras(tokens)

    q_block = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    kv_whole = pl.BlockSpec((None, lk, None, d), lambda i, b, h: (b, 0, h // g, 0))
    inputs = [("q", q, q_block), ("do", do, q_block), ("m", m, row_block), ("row_sum", row_sum, row_block),
              ("delta", delta, row_block), ("k", k, kv_whole), ("v", v, kv_whole), *extras,
              ("dq_first", dq_visits[0], _whole(dq_visits[0])), ("dq_count", dq_visits[1], _whole(dq_visits[1]))]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_block)]
    (dq,) = _call(_dq_kernel, cfg, (lq // bq, batch, heads), inputs, outputs, d, "flash_attention_dq")

    q_whole = pl.BlockSpec((None, lq, None, d), lambda j, b, h: (b, 0, h, 0))
    row_whole = pl.BlockSpec((None, None, lq), lambda j, b, h: (b, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h // g, 0))
    inputs = [("q", q, q_whole), ("do", do, q_whole), ("m", m, row_whole), ("row_sum", row_sum, row_whole),
              ("delta", delta, row_whole), ("k", k, kv_block), ("v", v, kv_block), *extras,
              ("dkv_first", dkv_visits[0], _whole(dkv_visits[0])),
              ("dkv_count", dkv_visits[1], _whole(dkv_visits[1]))]
    # One dK/dV per query head, summed over each GQA group below (in float32 when groups > 1).
    grad_dtype = k.dtype if g == 1 else jnp.float32
    per_head = jax.ShapeDtypeStruct((batch, lk, heads, d), grad_dtype)
    out_block = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
    outputs = [("dk", per_head, out_block), ("dv", per_head, out_block)]
    dk, dv = _call(_dkv_kernel, cfg, (lk // bk, batch, heads), inputs, outputs, d, "flash_attention_dkv")
    if g > 1:
        dk, dv = (x.reshape(batch, lk, heads // g, g, d).sum(3).astype(k.dtype) for x in (dk, dv))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, tokens, fwd_visits, dq_visits, dkv_visits):
    return _forward(cfg, q, k, v, tokens, fwd_visits)[0]


def _core_fwd(cfg, q, k, v, tokens, fwd_visits, dq_visits, dkv_visits):
    o, m, row_sum = _forward(cfg, q, k, v, tokens, fwd_visits)
    return o, (q, k, v, tokens, dq_visits, dkv_visits, o, m, row_sum)


def _core_bwd(cfg, res, do):
    q, k, v, tokens, dq_visits, dkv_visits, o, m, row_sum = res
    dq, dk, dv = _backward(cfg, q, k, v, tokens, dq_visits, dkv_visits, o, m, row_sum, do)
    return dq, dk, dv, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------------
# Public entry points.


def _pad_to(x, length, axis, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pad_layout(layout, rows: int, cols: int):
    """``layout`` extended with unvisited (False) rows and columns for blocks made only of padding."""
    extra = ((0, 0), (0, rows - layout.shape[1]), (0, cols - layout.shape[2]))
    return np.pad(layout, extra) if isinstance(layout, np.ndarray) else jnp.pad(jnp.asarray(layout, bool), extra)


def _platform_ok(method: str, interpret: bool) -> None:
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(
            f"{method}: compiled Pallas kernels lower through Triton and need a GPU (backend is "
            f"{jax.default_backend()!r}); pass interpret=True to run them interpreted.")


def blocked_attention(method, q, k, v, layout_fn, *, mask=None, segment_ids=None, causal=False, window=None,
                      global_tokens=None, sm_scale=None, blocks=None, interpret=None, num_warps=None,
                      num_stages=None, dropout_rate=0.0, dropout_seed=None):
    """Shared driver: pads to whole blocks, builds the visit lists from ``layout_fn`` and calls the kernels.

    ``layout_fn(block_q, block_k)`` returns a boolean tile layout [1 or heads, q_blocks, k_blocks]
    (numpy when static, which allows range visits and a tight table). ``global_tokens`` (bool
    [batch, length], self-attention, with ``window``) widens the window condition to
    ``|i - j| <= window or global[i] or global[j]``; the layout must list the tiles this adds.
    ``dropout_rate`` > 0 drops attention weights with the counter-based mask of ``kernels/dropout.py``
    drawn from ``dropout_seed`` (uint32 [2], e.g. ``dropout.seed_from_key(key)``).
    """
    interpret = interpret_default(interpret)
    _platform_ok(method, interpret)
    groups = check_inputs(method, q, k, v, interpret)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if mask is not None and mask.shape != (batch, kv_len):
        raise ValueError(f"{method}: mask must have shape [batch, kv_len] = {(batch, kv_len)}, got {mask.shape}.")
    if segment_ids is not None and (q_len != kv_len or segment_ids.shape != (batch, q_len)):
        raise ValueError(
            f"{method}: segment_ids must have shape [batch, length] = {(batch, q_len)} for self-attention, "
            f"got {segment_ids.shape} with q_len {q_len}, kv_len {kv_len}.")
    if window is not None and window < 0:
        raise ValueError(f"{method}: window must be >= 0, got {window}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{method}: dropout_rate must be in [0, 1), got {dropout_rate}.")
    if dropout_rate > 0.0 and dropout_seed is None:
        raise ValueError(f"{method}: dropout_rate {dropout_rate} needs a dropout_seed (dropout.seed_from_key(key)).")
    if global_tokens is not None:
        if window is None:
            raise ValueError(f"{method}: global_tokens widen a window; give a window.")
        if q_len != kv_len or tuple(global_tokens.shape) != (batch, q_len):
            raise ValueError(
                f"{method}: global_tokens must have shape [batch, length] = {(batch, q_len)} for self-attention, "
                f"got {tuple(global_tokens.shape)} with q_len {q_len}, kv_len {kv_len}.")
    blocks = blocks or tuning.flash_blocks(DEFAULT_BLOCKS["gpu" if jax.default_backend() == "gpu" else "cpu"])
    bq = check_block(method, "block_q", blocks.block_q, q_len, interpret)
    bk = check_block(method, "block_k", blocks.block_k, kv_len, interpret)
    bq_bwd = check_block(method, "block_q_bwd", blocks.block_q_bwd, q_len, interpret)
    bk_bwd = check_block(method, "block_k_bwd", blocks.block_k_bwd, kv_len, interpret)

    # Blocks are powers of two, so padding to the larger of the forward and backward blocks fits both.
    lq_pad = -(-q_len // max(bq, bq_bwd)) * max(bq, bq_bwd)
    lk_pad = -(-kv_len // max(bk, bk_bwd)) * max(bk, bk_bwd)
    fwd_layout = _pad_layout(layout_fn(bq, bk), lq_pad // bq, lk_pad // bk)
    same = (bq, bk) == (bq_bwd, bk_bwd)
    bwd_layout = fwd_layout if same else _pad_layout(layout_fn(bq_bwd, bk_bwd), lq_pad // bq_bwd, lk_pad // bk_bwd)
    if fwd_layout.shape[0] not in (1, heads):
        raise ValueError(f"{method}: the block layout has {fwd_layout.shape[0]} heads; expected 1 or {heads}.")
    fwd_visits = visit_lists(fwd_layout)
    dq_visits = fwd_visits if same else visit_lists(bwd_layout)
    dkv_visits = visit_lists(bwd_layout.swapaxes(-1, -2))
    cfg = Config(q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
                 causal=bool(causal), window=window, sm_scale=float(sm_scale or 1.0 / math.sqrt(head_dim)),
                 groups=groups, has_mask=mask is not None, has_segments=segment_ids is not None,
                 has_global=global_tokens is not None, dropout_keep_from=dropout.threshold(dropout_rate),
                 dropout_scale=1.0 / (1.0 - dropout_rate), heads_total=heads,
                 layout_heads=int(fwd_layout.shape[0]), fwd_mode=fwd_visits[0], dq_mode=dq_visits[0],
                 dkv_mode=dkv_visits[0], interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    tokens = {}  # per-batch int32 token arrays padded to whole blocks (padded keys: kmask 1, excluded anyway)
    if mask is not None:
        tokens["kmask"] = _pad_to(jnp.asarray(mask).astype(jnp.int32), lk_pad, 1, 1)
    for name, x in (("seg", segment_ids), ("glob", global_tokens)):
        if x is not None:
            x = jnp.asarray(x).astype(jnp.int32)
            tokens[name + "_q"], tokens[name + "_k"] = _pad_to(x, lq_pad, 1), _pad_to(x, lk_pad, 1)
    if dropout_rate > 0.0:
        tokens["seed"] = jnp.asarray(dropout_seed).astype(jnp.uint32).reshape(2)
    qp, kp, vp = _pad_to(q, lq_pad, 1), _pad_to(k, lk_pad, 1), _pad_to(v, lk_pad, 1)
    visits = (fwd_visits[1:], dq_visits[1:], dkv_visits[1:])

    def run(shard, qp, kp, vp, tokens, visits):
        if "seed" in tokens:  # the seed, then this shard's first batch row and head (the dropout stream index)
            offsets = jnp.stack([shard[sharding.BATCH] * qp.shape[0], shard[sharding.HEADS] * qp.shape[2]])
            tokens = {**tokens, "seed": jnp.concatenate([tokens["seed"], offsets.astype(jnp.uint32)])}
        return _core(cfg, qp, kp, vp, tokens, *visits)

    qkv_dims = (sharding.BATCH, None, sharding.HEADS)
    token_dims = {name: None if name == "seed" else (sharding.BATCH,) for name in tokens}
    layout_dims = (sharding.HEADS,) if cfg.layout_heads > 1 else None
    visit_dims = tuple((layout_dims, layout_dims) for _ in visits)
    out = sharding.per_shard(run, (qp, kp, vp, tokens, visits), (qkv_dims, qkv_dims, qkv_dims, token_dims, visit_dims),
                             qkv_dims, batch=batch, head_counts=(heads, k.shape[2]))
    return out[:, :q_len]


def flash_attention(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, sm_scale=None,
                    blocks: BlockSizes | None = None, interpret=None, num_warps=None, num_stages=None,
                    dropout_rate=0.0, dropout_seed=None):
    """softmax(q k^T / sqrt(d)) v over [batch, length, heads, head_dim] (k, v: [batch, kv_len, kv_heads, d]).

    Same arguments and result as ``effjax.attention.softmax.attend`` (``mask`` [batch, kv_len] True on
    real keys; ``segment_ids`` [batch, length], self-attention; ``causal`` aligned to the end), plus:
    ``window``: keys with |i + kv_len - q_len - j| <= window only (``sliding_window.attend``); key
    blocks outside the band are skipped, as are future blocks under ``causal``. kv_heads dividing the
    query heads gives grouped/multi-query attention. ``blocks``: block sizes (default per backend,
    ``DEFAULT_BLOCKS``, or the device's tuned ones from ``tuning.py``); lengths need not be multiples (padded
    internally). ``interpret``: default True on CPU.
    ``dropout_rate``/``dropout_seed``: attention dropout with the kernels' counter-based mask (see
    ``blocked_attention``); the same distribution as the reference's dropout, not the same draws.
    """
    def layout_fn(bq, bk):
        return band_layout(q.shape[1], k.shape[1], bq, bk, causal, window)

    return blocked_attention(NAME, q, k, v, layout_fn, mask=mask, segment_ids=segment_ids, causal=causal,
                             window=window, sm_scale=sm_scale, blocks=blocks, interpret=interpret,
                             num_warps=num_warps, num_stages=num_stages, dropout_rate=dropout_rate,
                             dropout_seed=dropout_seed)


def _allowed(q_len: int, kv_len: int, *, mask=None, segment_ids=None, causal=False, pair_mask=None):
    """Boolean [batch or 1, heads or 1, q_len, kv_len] of the pairs the reference lets attend."""
    allowed = jnp.ones((1, 1, q_len, kv_len), bool)
    if mask is not None:
        allowed = allowed & jnp.asarray(mask, bool)[:, None, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if causal:  # queries aligned to the end of the keys
        allowed = allowed & (jnp.arange(q_len)[:, None] + (kv_len - q_len) >= jnp.arange(kv_len)[None, :])
    if pair_mask is not None:
        allowed = allowed & pair_mask
    return allowed


def band(q_len: int, kv_len: int, window: int):
    """[q_len, kv_len]: |i + (kv_len - q_len) - j| <= window, the sliding-window pairs."""
    i = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    return jnp.abs(i - jnp.arange(kv_len)[None, :]) <= window


def reference_attend(q, k, v, pair_mask=None, *, mask=None, segment_ids=None, causal=False, dropout_rate=0.0,
                     dropout_seed=None):
    """Materialized softmax attention as the kernels define it, for tests: float32 logits scaled by
    1/sqrt(head_dim), disallowed pairs at float32's min (a row with none allowed averages all values), GQA by
    repeating kv heads, and dropout with the kernels' counter-based keep mask. ``pair_mask`` (bool,
    broadcastable to [batch, heads, q_len, kv_len]) restricts the pairs further. The references of every
    kernel built on ``blocked_attention`` call this; it imports nothing from effjax.attention, so the
    conformance sweep (method's pallas path against its XLA path) and these kernel tests check independently.
    """
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    allowed = _allowed(q.shape[1], k.shape[1], mask=mask, segment_ids=segment_ids, causal=causal,
                       pair_mask=pair_mask)
    weights = jax.nn.softmax(jnp.where(allowed, logits, MASKED), axis=-1)
    if dropout_rate > 0.0:
        keep = dropout.keep_mask(jnp.asarray(dropout_seed).astype(jnp.uint32), q.shape[0], q.shape[2], q.shape[1],
                                 k.shape[1], dropout_rate)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def reference(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, dropout_rate=0.0,
              dropout_seed=None):
    """The plain-JAX computation ``flash_attention`` accelerates (``reference_attend`` with the window band)."""
    pair = None if window is None else band(q.shape[1], k.shape[1], window)[None, None]
    return reference_attend(q, k, v, pair, mask=mask, segment_ids=segment_ids, causal=causal,
                            dropout_rate=dropout_rate, dropout_seed=dropout_seed)

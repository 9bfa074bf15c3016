"""The softmax family on TPU through JAX's own splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``).

Backend ``mosaic_tpu`` of the kernel dispatch: ``attention`` (= ``flash_attention.flash_attention``),
``block_sparse`` (= ``block_sparse.block_sparse_attention``) and ``window_global`` (=
``block_sparse.window_global_attention``), same keyword arguments and results, [batch, length, heads,
head_dim] in and out. Splash (sparse flash attention, FlashAttention-2's online softmax written for Mosaic TPU)
takes one example at a time, head-major [heads, length, head_dim], an unscaled ``q``, a *static* mask (a
description such as ``CausalMask`` or any ``Mask`` it slices block by block) and ``SegmentIds``; it skips
the key blocks the static mask leaves empty, forward and backward (its own custom VJP). Here:

- ``sm_scale`` is folded into ``q``; the batch is ``vmap``-ed; head_dim is zero-padded to a multiple of 128
  (exact: zero columns add nothing to ``q k^T`` and give zero output columns that are cut off); lengths are
  padded to a multiple of 128 and the tile is the largest of 512/256/128 dividing the padded length.
- Patterns: causal (aligned to the end, ``CausalMask(offset=kv_len - q_len)``), ``window`` (``LocalMask``),
  block layouts and Longformer's window-or-global pattern (``_Pattern``: a lazily sliced numpy predicate,
  never materialised whole), per head through ``MultiHeadMask``.
- Splash has no key mask: key padding, ``segment_ids`` and the keys added by padding become segment ids;
  excluded keys get an id no query has (one below the smallest query id). Their logits are splash's mask
  value, so they carry exactly zero weight in every row that has an allowed key.
- A query with no allowed key returns the reference's answer, the mean of all values, with no q/k gradient
  (splash alone would average whatever its visited blocks hold, and divide by zero where it visits none).
  Rows with no key in the static pattern (causal cross attention with q_len > kv_len, empty block rows) are
  known on the host; they are given key 0 so that splash stays finite, and their output is replaced. Rows
  whose keys ``mask``/``segment_ids`` remove are found by ``_key_in_range`` (a binary search over the keys
  sorted by segment, O(length log length)), and replaced likewise; the replaced rows pass splash a zero
  cotangent, so its backward adds nothing for them.
- Refused: dropout, a traced block mask, global tokens that are traced or differ across the batch.

Under a device mesh the core runs per shard (``sharding.per_shard``); splash's mask tables are built for
the number of head shards and split with the heads, as its ``manual_sharding_spec`` describes.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from effjax.kernels import flash_attention as flash
from effjax.kernels import sharding
from effjax.kernels.backend import interpret_default

NAME = "mosaic_tpu"
PLATFORMS = ("tpu",)
LANES = 128  # splash's tiles and head_dim are multiples of the TPU lane width
TILES = (512, 256, 128)  # preferred tile sizes, largest first
_SHARDED_FIELDS = ("data_next", "mask_next", "block_mask")  # splash MaskInfo tables with a leading heads axis


# ----------------------------------------------------------------------------------------------------
# Static patterns.


class _Pattern(masks.Mask):
    """A static [q_len, kv_len] pattern given by a vectorised numpy predicate ``fn(rows, cols)``.

    Splash only ever slices a mask block by block, so nothing of size q_len x kv_len is built. ``key`` is a
    hashable description of the pattern: splash de-duplicates per-head masks by hash and equality.
    """

    def __init__(self, shape, key, fn):
        self._shape, self._key, self._fn = tuple(shape), key, fn

    @property
    def shape(self):
        return self._shape

    def __getitem__(self, idx):
        rows, cols = idx
        rows = np.arange(*rows.indices(self._shape[0]))[:, None]
        cols = np.arange(*cols.indices(self._shape[1]))[None, :]
        out = np.broadcast_to(self._fn(rows, cols), (rows.shape[0], cols.shape[1]))
        return np.ascontiguousarray(out, dtype=bool)

    def __eq__(self, other):
        return isinstance(other, _Pattern) and (self._shape, self._key) == (other._shape, other._key)

    def __hash__(self):
        return hash((self._shape, self._key))


def _band_rows(rows, lk, off, causal, window):
    """(lo, hi): the keys [lo, hi] of ``[0, lk)`` that query rows ``rows`` may see under causal and window."""
    lo = np.zeros_like(rows) if window is None else np.maximum(rows + off - window, 0)
    hi = np.full_like(rows, lk - 1)
    if causal:
        hi = np.minimum(hi, rows + off)
    elif window is not None:
        hi = np.minimum(hi, rows + off + window)
    return lo, hi


def _band_mask(shape, q_len, kv_len, causal, window):
    """Splash mask of the causal/window band on the padded grid, and the real rows with no real key.

    A padded-grid row with no key at all (possible only when q_len > kv_len) is given key 0, so that every
    query block visits a key block (splash divides by zero otherwise); its output is replaced anyway.
    """
    lq, lk = shape
    off = kv_len - q_len
    rows = np.arange(lq)
    lo, hi = _band_rows(rows, kv_len, off, causal, window)
    empty_real = (lo > hi) & (rows < q_len)
    lo, hi = _band_rows(rows, lk, off, causal, window)
    if not np.any(lo > hi):
        if window is not None:
            return masks.LocalMask(shape, (window, 0 if causal else window), off), empty_real[None]
        if causal:
            return masks.CausalMask(shape, off), empty_real[None]
        return masks.FullMask(shape), empty_real[None]
    patch = lo > hi

    def fn(i, j):
        ok = np.ones(np.broadcast_shapes(i.shape, j.shape), bool)
        if causal:
            ok &= j <= i + off
        if window is not None:
            ok &= np.abs(i + off - j) <= window
        return ok | (patch[i] & (j == 0))

    return _Pattern(shape, ("band", q_len, kv_len, causal, window), fn), empty_real[None]


def _block_masks(shape, q_len, kv_len, layout, bq, bk, causal):
    """Per-head splash masks of a block layout [H or 1, q_blocks, k_blocks] (AND causal), and empty real rows."""
    lq, lk = shape
    off = kv_len - q_len
    rows = np.arange(lq)
    nq, nk = layout.shape[1:]
    in_grid = rows < nq * bq
    qblock = np.minimum(rows // bq, nq - 1)
    far = np.iinfo(np.int64).max
    starts = np.where(layout, np.arange(nk)[None, None, :] * bk, far).min(-1)  # [H, nq]: first listed key
    first = np.where(in_grid, starts[:, qblock], far)  # [H, lq]
    limit = rows + off if causal else np.full_like(rows, far)
    empty_real = (first > np.minimum(kv_len - 1, limit)) & (rows < q_len)
    patch = first > np.minimum(lk - 1, limit)  # no key on the padded grid: give key 0 (output replaced)
    result = []
    for h in range(layout.shape[0]):
        blocks, rows_patch = layout[h], patch[h]

        def fn(i, j, blocks=blocks, rows_patch=rows_patch):
            qi, kj = i // bq, j // bk
            ok = blocks[np.minimum(qi, nq - 1), np.minimum(kj, nk - 1)] & (qi < nq) & (kj < nk)
            if causal:
                ok &= j <= i + off
            return ok | (rows_patch[i] & (j == 0))

        key = ("blocks", q_len, kv_len, bq, bk, causal, blocks.tobytes(), blocks.shape)
        result.append(_Pattern(shape, key, fn))
    return result, empty_real


def _block_ranges(layout, q_len, kv_len, bq, bk, causal):
    """The keys each query may see under a block layout, as ranges: (lo, hi) int [H, W, q_len], one range per
    run of consecutive listed blocks (W: the most runs in a row; missing runs are empty, lo > hi)."""
    runs = [[[] for _ in range(layout.shape[1])] for _ in range(layout.shape[0])]
    for h, r in zip(*np.nonzero(layout.any(-1)), strict=True):
        row = np.concatenate([[False], layout[h, r], [False]])
        starts, ends = np.flatnonzero(row[1:] & ~row[:-1]), np.flatnonzero(row[:-1] & ~row[1:])
        runs[h][r] = list(zip(starts * bk, np.minimum(ends * bk, kv_len) - 1, strict=True))
    width = max(1, max(len(row) for head in runs for row in head))
    lo, hi = np.ones(layout.shape[:2] + (width,), np.int64), np.zeros(layout.shape[:2] + (width,), np.int64)
    for h, head in enumerate(runs):
        for r, row in enumerate(head):
            for w, (a, b) in enumerate(row):
                lo[h, r, w], hi[h, r, w] = a, b
    rows = np.arange(q_len)
    lo, hi = lo[:, rows // bq].transpose(0, 2, 1), hi[:, rows // bq].transpose(0, 2, 1)
    if causal:
        hi = np.minimum(hi, rows + kv_len - q_len)
    return lo, hi


def _window_global_mask(shape, length, window, flags, causal):
    """Longformer's pattern: |i - j| <= window or global[i] or global[j] (AND causal), ``flags`` bool [length]."""
    if flags is None or not flags.any():
        return masks.LocalMask(shape, (window, 0 if causal else window), 0)
    glob = np.zeros(shape[0], bool)
    glob[:length] = flags

    def fn(i, j):
        ok = (np.abs(i - j) <= window) | glob[i] | glob[j]
        return ok & (j <= i) if causal else ok

    return _Pattern(shape, ("window_global", length, window, causal, glob.tobytes()), fn)


def _key_in_range(seg_q, seg_k, lo, hi):
    """bool [batch, q_len]: whether some key j in [lo_i, hi_i] has ``seg_k[b, j] == seg_q[b, i]``.

    Rows with no allowed key are invisible to splash (masked logits all get one finite value), so they are
    found here: the keys sorted by (segment, position), then one vectorised binary search per query for the
    first key at or after (its segment, lo_i). O(length log length); ``lo``/``hi`` broadcast to [batch, q_len].
    """
    n = seg_k.shape[1]
    order = jnp.argsort(seg_k, axis=1, stable=True).astype(jnp.int32)  # positions ascend within a segment
    sorted_seg = jnp.take_along_axis(seg_k, order, 1)
    lo, hi = (jnp.broadcast_to(jnp.asarray(x, jnp.int32), seg_q.shape) for x in (lo, hi))
    left, right = jnp.zeros(seg_q.shape, jnp.int32), jnp.full(seg_q.shape, n, jnp.int32)
    for _ in range(n.bit_length()):
        mid = jnp.minimum((left + right) // 2, n - 1)
        seg_mid, pos_mid = jnp.take_along_axis(sorted_seg, mid, 1), jnp.take_along_axis(order, mid, 1)
        before = (left < right) & ((seg_mid < seg_q) | ((seg_mid == seg_q) & (pos_mid < lo)))
        left, right = jnp.where(before, mid + 1, left), jnp.where(before | (left >= right), right, mid)
    found = jnp.minimum(left, n - 1)
    return ((left < n) & (lo <= hi) & (jnp.take_along_axis(sorted_seg, found, 1) == seg_q)
            & (jnp.take_along_axis(order, found, 1) <= hi))


# ----------------------------------------------------------------------------------------------------
# Checks and refusals.


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(length: int, hint=None) -> int:
    """Splash tile for a padded ``length`` (a multiple of 128): ``hint`` rounded up to a multiple of 128 when it
    divides the length, else the largest of TILES that does."""
    if hint:
        tile = min(_round_up(int(hint), LANES), length)
        if length % tile == 0:
            return tile
    return next(t for t in TILES if length % t == 0)


def _concrete(x):
    """``x`` as a numpy array when its value is known here, else None (traced or a ShapeDtypeStruct)."""
    if x is None or isinstance(x, jax.ShapeDtypeStruct):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def _platform_ok(method: str, interpret: bool) -> None:
    if not interpret and jax.default_backend() != "tpu":
        raise NotImplementedError(
            f"{method}: compiled splash kernels lower through Mosaic and need a TPU (backend is "
            f"{jax.default_backend()!r}); pass interpret=True to run them interpreted.")


def supports(op: str, call: dict) -> str | None:
    """None when this backend can run ``op`` with the entry point's keyword arguments ``call`` here, else why not."""
    if op not in OPS:
        return f"op {op!r} (mosaic_tpu implements {', '.join(OPS)})"
    rate = call.get("dropout_rate")
    if rate is not None and (_concrete(rate) is None or float(_concrete(rate)) > 0.0):  # traced: may be > 0
        return "dropout"
    q = call.get("q")
    if q is not None and jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"dtype {jnp.dtype(q.dtype).name} (float32 and bfloat16 only)"
    if not interpret_default(call.get("interpret")) and jax.default_backend() != "tpu":
        return f"compiled Mosaic TPU kernels on backend {jax.default_backend()!r} (a TPU, or interpret=True)"
    if op == "block_sparse" and call.get("block_mask") is not None and _concrete(call["block_mask"]) is None:
        return "traced block_mask"
    if op == "window_global" and call.get("global_tokens") is not None:
        flags = _concrete(call["global_tokens"])
        if flags is None:
            return "traced global_tokens"
        flags = flags.astype(bool)
        if flags.ndim == 2 and not np.all(flags == flags[:1]):
            return "global tokens that differ across the batch"
    return None


def _check(method, q, k, v, mask, segment_ids, window, dropout_rate):
    flash.check_shapes(method, q, k, v)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if mask is not None and tuple(mask.shape) != (batch, kv_len):
        raise ValueError(f"{method}: mask must have shape [batch, kv_len] = {(batch, kv_len)}, got {mask.shape}.")
    if segment_ids is not None and (q_len != kv_len or tuple(segment_ids.shape) != (batch, q_len)):
        raise ValueError(
            f"{method}: segment_ids must have shape [batch, length] = {(batch, q_len)} for self-attention, "
            f"got {segment_ids.shape} with q_len {q_len}, kv_len {kv_len}.")
    if window is not None and window < 0:
        raise ValueError(f"{method}: window must be >= 0, got {window}.")
    if dropout_rate:
        raise NotImplementedError(f"{method}: {NAME} has no attention dropout (splash draws no random bits); "
                                  "use the flash kernel or impl='xla'.")


# ----------------------------------------------------------------------------------------------------
# The shared driver.


@functools.lru_cache(maxsize=64)
def _kernel(head_masks, blocks, head_shards, interpret):
    """Splash kernel (pytree of its mask tables) for a tuple of per-head masks; cached: building walks every tile.

    Built in compile-time evaluation, so the tables are concrete arrays (constants of any trace), not tracers
    of the jit that first asked for them.
    """
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(masks.MultiHeadMask(list(head_masks)), block_sizes=blocks,
                                      head_shards=head_shards, q_seq_shards=1, interpret=interpret)


def _head_shards(batch, heads, kv_heads) -> int:
    axes = sharding.plan(batch, heads, kv_heads)
    if axes is None or axes[sharding.HEADS] is None:
        return 1
    names = axes[sharding.HEADS]
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[n] for n in ((names,) if isinstance(names, str) else names))


def _pad(x, axis, length, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return x if length == x.shape[axis] else jnp.pad(x, widths, constant_values=value)


def _run(method, q, k, v, build_masks, *, mask, segment_ids, sm_scale, blocks, interpret, rows_with_key=None):
    """Pads, builds the static masks with ``build_masks(shape) -> (per-head masks, empty real rows [H or 1,
    Lq_pad])``, runs splash per example (and per shard) and replaces rows with no allowed key by the mean value.

    ``rows_with_key(seg_q, seg_k)``: bool [batch, q_len] (or [batch, heads, q_len]), the rows with an allowed
    key once ``mask`` and ``segment_ids`` apply (``seg_k`` holds an id no query has at excluded keys).
    """
    interpret = interpret_default(interpret)
    _platform_ok(method, interpret)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    lq, lk, dp = _round_up(q_len, LANES), _round_up(kv_len, LANES), _round_up(head_dim, LANES)
    hint = {} if blocks is None else {  # flash's BlockSizes field names, else splash's
        "q": getattr(blocks, "block_q", None), "k": getattr(blocks, "block_k", getattr(blocks, "block_kv", None)),
        "q_bwd": getattr(blocks, "block_q_bwd", getattr(blocks, "block_q_dkv", None)),
        "k_bwd": getattr(blocks, "block_k_bwd", getattr(blocks, "block_kv_dkv", None))}
    bq, bk = _tile(lq, hint.get("q")), _tile(lk, hint.get("k"))
    bq_bwd, bk_bwd = _tile(lq, hint.get("q_bwd")), _tile(lk, hint.get("k_bwd"))
    tiles = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq_bwd, block_kv_dkv=bk_bwd,
                              block_kv_dkv_compute=bk_bwd, block_q_dq=bq_bwd, block_kv_dq=bk_bwd)
    head_masks, empty = build_masks((lq, lk))
    if len(head_masks) == 1:
        head_masks = head_masks * heads
    shards = _head_shards(batch, heads, kv_heads)
    kernel = _kernel(tuple(head_masks), tiles, shards, interpret)

    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)

    def head_major(x, length, factor=None):
        if factor is not None:
            x = (x.astype(jnp.float32) * factor).astype(x.dtype)
        return _pad(_pad(x, 1, length), 3, dp).transpose(0, 2, 1, 3)  # [batch, heads, length, dp]

    qh, kh, vh = head_major(q, lq, scale), head_major(k, lk), head_major(v, lk)
    segments = None
    if mask is not None or segment_ids is not None or lk != kv_len:
        seg = jnp.zeros((batch, q_len), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        seg_q = _pad(seg, 1, lq)
        kv_seg = jnp.zeros((batch, kv_len), jnp.int32) if segment_ids is None else seg
        excluded = jnp.min(seg_q, axis=1, keepdims=True) - 1  # an id no query has
        if mask is not None:
            kv_seg = jnp.where(jnp.asarray(mask, bool), kv_seg, excluded)
        seg_kv = jnp.concatenate([kv_seg, jnp.broadcast_to(excluded, (batch, lk - kv_len))], 1)
        segments = (seg_q, seg_kv)
    dynamic_empty = None
    if rows_with_key is not None and (mask is not None or segment_ids is not None):
        dynamic_empty = ~rows_with_key(seg_q[:, :q_len], seg_kv[:, :kv_len])  # [batch, q_len]

    leaves, treedef = jax.tree_util.tree_flatten_with_path(kernel)
    leaf_dims = [(sharding.HEADS,) if getattr(path[-1], "name", None) in _SHARDED_FIELDS else None
                 for path, _ in leaves]
    leaves = [leaf for _, leaf in leaves]

    def run(shard, qh, kh, vh, segments, leaves):
        local = jax.tree_util.tree_unflatten(treedef, leaves)

        def one(q1, k1, v1, seg):
            return local(q1, k1, v1, segment_ids=None if seg is None else splash.SegmentIds(*seg))

        if qh.shape[0] == 1:  # one example (per shard): no vmap, which TPU interpret mode cannot run (see README)
            return one(qh[0], kh[0], vh[0], jax.tree.map(lambda x: x[0], segments))[None]
        return jax.vmap(one)(qh, kh, vh, segments)

    qkv_dims = (sharding.BATCH, sharding.HEADS)
    seg_dims = None if segments is None else ((sharding.BATCH,), (sharding.BATCH,))
    out = sharding.per_shard(run, (qh, kh, vh, segments, leaves), (qkv_dims, qkv_dims, qkv_dims, seg_dims, leaf_dims),
                             qkv_dims, batch=batch, head_counts=(heads, kv_heads))
    out = out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)
    empty = np.asarray(empty)[:, :q_len].T[None, :, :, None]  # [1, q_len, heads or 1, 1]
    if dynamic_empty is not None:  # [batch, q_len] or, per head, [batch, heads, q_len]
        dynamic_empty = dynamic_empty.swapaxes(1, 2) if dynamic_empty.ndim == 3 else dynamic_empty[:, :, None]
        empty = jnp.asarray(empty) | dynamic_empty[..., None]
    if dynamic_empty is not None or empty.any():  # no allowed key: the reference's uniform average over all keys
        mean = jnp.mean(v.astype(jnp.float32), axis=1).astype(v.dtype)  # [batch, kv_heads, head_dim]
        mean = jnp.repeat(mean, heads // kv_heads, axis=1)[:, None]
        out = jnp.where(empty, mean, out)
    return out


# ----------------------------------------------------------------------------------------------------
# Entry points (the dispatch contract: the keyword signatures of the flash and block-sparse kernels).


def attention(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, sm_scale=None, blocks=None,
              interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0, dropout_seed=None):
    """``flash_attention.flash_attention`` through splash: softmax(q k^T * sm_scale) v, [batch, len, heads, d].

    ``mask`` [batch, kv_len] (True on real keys), ``segment_ids`` [batch, length], ``causal`` aligned to the
    end, ``window`` (|i + kv_len - q_len - j| <= window), GQA/MQA. ``blocks``: tile hints (flash's or splash's
    BlockSizes), rounded up to multiples of 128. ``num_warps``/``num_stages`` are ignored (Triton knobs).
    """
    del num_warps, num_stages, dropout_seed
    _check(NAME, q, k, v, mask, segment_ids, window, dropout_rate)
    q_len, kv_len = q.shape[1], k.shape[1]

    def build(shape):
        head_mask, empty = _band_mask(shape, q_len, kv_len, bool(causal), window)
        return [head_mask], empty

    def rows_with_key(seg_q, seg_k):
        lo, hi = _band_rows(np.arange(q_len), kv_len, kv_len - q_len, bool(causal), window)
        return _key_in_range(seg_q, seg_k, lo[None], hi[None])

    return _run(NAME, q, k, v, build, mask=mask, segment_ids=segment_ids, sm_scale=sm_scale, blocks=blocks,
                interpret=interpret, rows_with_key=rows_with_key)


def block_sparse(q, k, v, block_mask, *, block_size=64, mask=None, segment_ids=None, causal=False, sm_scale=None,
                 interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0, dropout_seed=None):
    """``block_sparse.block_sparse_attention`` through splash: the tiles of a numpy ``block_mask`` [heads or 1,
    q_blocks, k_blocks] at ``block_size`` (int or (block_q, block_k), any size) as a static token-level mask."""
    del num_warps, num_stages, dropout_seed
    method = f"{NAME}.block_sparse"
    _check(method, q, k, v, mask, segment_ids, None, dropout_rate)
    layout = _concrete(block_mask)
    if layout is None:
        raise NotImplementedError(f"{method}: a traced block_mask cannot become splash's static mask; pass a "
                                  "numpy layout or use block_sparse.block_sparse_attention.")
    layout = layout.astype(bool)
    layout = layout[None] if layout.ndim == 2 else layout
    bq, bk = (int(block_size),) * 2 if np.ndim(block_size) == 0 else tuple(int(b) for b in block_size)
    q_len, kv_len, heads = q.shape[1], k.shape[1], q.shape[2]
    want = (-(-q_len // bq), -(-kv_len // bk))
    if layout.ndim != 3 or layout.shape[1:] != want or layout.shape[0] not in (1, heads):
        raise ValueError(f"{method}: block_mask must have shape [1 or {heads}, {want[0]}, {want[1]}], got "
                         f"{tuple(np.shape(block_mask))}.")

    def build(shape):
        return _block_masks(shape, q_len, kv_len, layout, bq, bk, bool(causal))

    def rows_with_key(seg_q, seg_k):
        lo, hi = _block_ranges(layout, q_len, kv_len, bq, bk, bool(causal))  # [H, W, q_len]
        heads_, width = lo.shape[:2]
        found = _key_in_range(jnp.tile(seg_q, (1, heads_ * width)), seg_k, lo.reshape(1, -1), hi.reshape(1, -1))
        return found.reshape(-1, heads_, width, q_len).any(2)

    return _run(method, q, k, v, build, mask=mask, segment_ids=segment_ids, sm_scale=sm_scale, blocks=None,
                interpret=interpret, rows_with_key=rows_with_key)


def window_global(q, k, v, *, window: int, global_tokens=None, mask=None, segment_ids=None, causal=False,
                  sm_scale=None, blocks=None, interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0,
                  dropout_seed=None):
    """``block_sparse.window_global_attention`` through splash: |i - j| <= window or global[i] or global[j],
    with ``global_tokens`` [batch, length] concrete and the same in every batch row (one static mask)."""
    del num_warps, num_stages, dropout_seed
    method = f"{NAME}.window_global"
    _check(method, q, k, v, mask, segment_ids, window, dropout_rate)
    length = q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"{method}: self-attention only (q_len {length}, kv_len {k.shape[1]}).")
    flags = None
    if global_tokens is not None:
        flags = _concrete(global_tokens)
        if flags is None:
            raise NotImplementedError(f"{method}: traced global_tokens cannot become splash's static mask; use "
                                      "block_sparse.window_global_attention.")
        flags = flags.astype(bool)
        if flags.shape != (q.shape[0], length):
            raise ValueError(f"{method}: global_tokens must have shape [batch, length] = {(q.shape[0], length)}, "
                             f"got {flags.shape}.")
        if not np.all(flags == flags[:1]):
            raise NotImplementedError(f"{method}: global tokens that differ across the batch need one mask per "
                                      "example; use block_sparse.window_global_attention.")
        flags = flags[0]

    def build(shape):
        return [_window_global_mask(shape, length, window, flags, bool(causal))], np.zeros((1, shape[0]), bool)

    def rows_with_key(seg_q, seg_k):
        rows = np.arange(length)
        lo, hi = _band_rows(rows, length, 0, bool(causal), window)
        found = _key_in_range(seg_q, seg_k, lo[None], hi[None])
        if flags is not None and flags.any():
            last = (rows if causal else np.full_like(rows, length - 1))[None]  # global pairs: any key up to here
            global_keys = jnp.where(jnp.asarray(flags)[None], seg_k, jnp.min(seg_q, 1, keepdims=True) - 1)
            found |= _key_in_range(seg_q, global_keys, 0, last)
            found |= jnp.asarray(flags)[None] & _key_in_range(seg_q, seg_k, 0, last)
        return found

    return _run(method, q, k, v, build, mask=mask, segment_ids=segment_ids, sm_scale=sm_scale, blocks=blocks,
                interpret=interpret, rows_with_key=rows_with_key)


OPS = {"attention": attention, "block_sparse": block_sparse, "window_global": window_global}


"""DiffRate: Differentiable Compression Rate (Chen et al., ICCV 2023, arXiv 2305.17997), Sec. 3, as in the
released code (tokens.md Sec. 5).

One reduction, after the attention residual and before the MLP (Sec. 3.1): tokens are sorted by the CLS
token's attention to them averaged over heads (the prefix tokens first, never pruned or merged); the tail is
pruned, keeping ``P`` tokens; of those, the first ``M`` (``keep``) are destinations and each of the other
``P - M`` merges into its most cosine-similar destination under the token features ``x`` (the residual stream
after the attention, no gradient through the matching); the prefix tokens are never destinations. As in the
reference, features merge by an **unweighted** mean of the destination and its sources (not size-weighted), and
each source's size is **multiplied by its similarity** before it is added to the destination's (the paper's
similarity-aware proportional attention), so merged sizes do not sum to the original count. Output in the
sorted order: prefix, then the destinations by decreasing CLS attention.

How many are pruned: with ``prune_kept``/``merge_kept`` (the per-layer lists of a published schedule,
``compression_rate.json``) the layer is found by simulating the schedule (it enters with ``n`` tokens and keeps
``min(P, M)``), and ``schedule()`` turns the lists into ``model.tokens`` (``r`` and params); otherwise
``prune_share`` of the layer's removals are pruned and the rest merged. A fixed schedule is training-free.

``learned=True`` is the differentiable discrete proxy (Sec. 3.2, ``ddp.py``): a prune and a merge proxy per
layer, each with logits (initialised to 0) over candidate kept counts ``keep, keep - g, keep - 2g, ... >
prefix`` (``g = granularity``); the kept count is the straight-through ceiling of the softmax-expected
candidate, ``M <= P``, and rank i's keep probability is the softmax mass of the candidates above i. Static
shapes: the schedule's ``keep`` is the capacity; ranks past ``P`` are pruned and ranks in ``[M, P)`` merged,
and their slots stay in the output, masked (``TokenState.mask``), as in DiffRate's training. The gradient
reaches the logits by a straight-through mask on the output features (forward 0/1, backward the keep
probability), where DiffRate puts it in a masked softmax of the next attention (this interface passes the mask
as booleans); the straight-through counts ``(P, M)`` are sown as ``intermediates/diffrate_kept``, and the
token state's ``count`` carries ``min(M, count entering)`` so the model's FLOPs loss
``model.tokens.flops_weight * (GMACs - model.tokens.flops_target)^2`` (lambda = 5 in the paper) reaches the
logits. Without ``r``/``keep``, learned rates get DiffRate's own layout: every block but the first reduces,
each from its full entering length (``effjax.tokens.plan``). DiffRate trains only the proxies (the ViT frozen):
``config.trainable='prune_logits|merge_logits'``.

``flops`` is the reference's analytic count (MACs: attention ``4NC^2 + 2N^2C`` on the tokens entering the block,
MLP ``8NC^2`` on those left, the patch embedding on every token and the head); on the published schedules it
gives DeiT-S "2.9" 2.905 G and DeiT-B "11.5" 11.517 G (``PUBLISHED``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens import flops as flops_lib
from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", needs=("cls_attention",), min_prefix=1, max_prefix=2, rate_param="learned",
            notes="sort by CLS attention, prune the tail, merge the next tail (unweighted mean, size x similarity); "
                  "learned=True: straight-through rate proxies with a masked fixed capacity")

# Published per-layer (prune_kept, merge_kept) schedules of DiffRate's compression_rate.json
# (OpenGVLab/DiffRate@91ae3e3, data of the learned schedules): DeiT-S at 2.9 G and DeiT-B at 11.5 G.
PUBLISHED = {
    "deit_s_2.9": ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                   (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
    "deit_b_11.5": ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3),
                    (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
}


def flops(prune_kept, merge_kept, *, embed_dim: int, num_tokens: int = 197, patch_size: int = 16,
          channels: int = 3, num_classes: int = 1000):
    """DiffRate's analytic MACs of a ViT whose block l keeps ``min(prune_kept[l], merge_kept[l])`` tokens (the
    counts may be traced, e.g. the learned proxies' straight-through counts)."""
    traced = any(isinstance(count, jax.Array) for count in (*prune_kept, *merge_kept))
    c = embed_dim
    n = jnp.float32(num_tokens) if traced else num_tokens  # Python ints count exactly (no int32 overflow)
    total = flops_lib.patch_and_head_macs(num_tokens, c, patch_size, channels, num_classes)
    for p, m in zip(prune_kept, merge_kept, strict=True):
        total = total + 4 * n * c * c + 2 * n * n * c
        n = jnp.minimum(jnp.minimum(n, p), m) if traced else min(n, p, m)
        total = total + 8 * n * c * c
    return total


def schedule(prune_kept, merge_kept, num_tokens: int = 197) -> dict:
    """``model.tokens`` for a published schedule: ``r`` per layer and the params that locate each layer."""
    removals, n = [], num_tokens
    for p, m in zip(prune_kept, merge_kept, strict=True):
        left = min(n, p, m)
        removals.append(n - left)
        n = left
    # r as the command line spells a per-layer list: a model field turns a list into a tuple, which the schedule
    # would read as ToMe's (r, inflection) when it has two entries.
    return dict(method="diffrate", r=",".join(map(str, removals)),
                params=dict(prune_kept=tuple(prune_kept), merge_kept=tuple(merge_kept)))


def pruned_count(n: int, keep: int, n0: int, prune_kept=None, merge_kept=None, prune_share: float = 0.5) -> int:
    """How many of the ``n - keep`` tokens a layer removes are pruned (the rest merge)."""
    if prune_kept is None or merge_kept is None:
        return int(prune_share * (n - keep))
    entering = n0
    for p, m in zip(prune_kept, merge_kept, strict=True):
        p = min(p, entering)
        left = min(p, m)
        if entering == n and left == keep:
            return n - p
        entering = left
    raise ValueError(f"diffrate: no layer of the schedule prune_kept={tuple(prune_kept)}, "
                     f"merge_kept={tuple(merge_kept)} goes from {n} to {keep} tokens (from {n0}); set "
                     "model.tokens from effjax.tokens.diffrate.schedule(prune_kept, merge_kept, num_tokens).")


def sort_order(importance, prefix: int, mask=None):
    """Positions by decreasing importance: the prefix tokens first (in order), padded tokens last."""
    n = importance.shape[1]
    key = jax.lax.stop_gradient(importance.astype(jnp.float32))
    key = jnp.where(_ranking.prefix_flags(n, prefix), jnp.inf, jnp.nan_to_num(key))
    if mask is not None:
        key = jnp.where(mask, key, -jnp.inf)
    return jnp.argsort(-key, axis=1)


def _destinations(metric_sorted, dest_ok, prefix: int):
    """Most similar allowed destination (a rank) and its similarity for every rank."""
    sim = _ranking.cosine(metric_sorted, metric_sorted)
    n = sim.shape[-1]
    allowed = dest_ok & ~_ranking.prefix_flags(n, prefix)[None]
    sim = jnp.where(allowed[:, None, :], sim, -jnp.inf)
    return jnp.argmax(sim, axis=2).astype(jnp.int32), jnp.max(sim, axis=2)


def _to_original(order, per_rank):
    rows = jnp.arange(order.shape[0])[:, None]
    return jnp.zeros(order.shape, per_rank.dtype).at[rows, order].set(per_rank)


def prune_merge(x, tokens, importance, metric, keep: int, pruned: int, prefix: int = 1):
    """One DiffRate step: prune the ``pruned`` least important tokens, merge the next ``n - pruned - keep``
    into their most similar of the ``keep`` most important (prefix excluded as destinations)."""
    batch, n = importance.shape
    if keep >= n:
        return x, tokens
    kept = n - pruned
    if not keep <= kept <= n:
        raise ValueError(f"diffrate: cannot prune {pruned} of {n} tokens and keep {keep}.")
    order = sort_order(importance, prefix, tokens.mask)
    rank = jnp.arange(n, dtype=jnp.int32)[None]
    if kept > keep:
        metric_sorted = jnp.take_along_axis(jax.lax.stop_gradient(metric), order[..., None], axis=1)
        real = jnp.ones((batch, n), bool) if tokens.mask is None else jnp.take_along_axis(tokens.mask, order, 1)
        dest, sim = _destinations(metric_sorted, (rank < keep) & real, prefix)
    else:
        dest, sim = jnp.zeros((batch, n), jnp.int32), jnp.ones((batch, n), jnp.float32)
    source = (rank >= keep) & (rank < kept)
    assign = jnp.where(rank < keep, rank, jnp.where(source, dest, -1))
    size_weight = jnp.where(source, sim, 1.0)
    return state_lib.reduce(x, tokens, _to_original(order, assign), keep,
                            weights=jnp.ones((batch, n), jnp.float32),
                            size_weights=_to_original(order, size_weight))


def candidates(keep: int, prefix: int, granularity: int = 4):
    """The learned proxies' candidate kept counts: ``keep, keep - g, ...`` down to more than ``prefix``."""
    return np.arange(keep, prefix, -max(granularity, 1))


def _ste_ceil(value):
    return value + jax.lax.stop_gradient(jnp.ceil(value) - value)


def learned_prune_merge(x, tokens, importance, metric, keep: int, prune_logits, merge_logits, prefix: int = 1,
                        granularity: int = 4):
    """The learned-rate form: ``(x', tokens', (P, M))`` with ``keep`` slots, ranks from ``M`` on masked."""
    batch, n = importance.shape
    counts = jnp.asarray(candidates(keep, prefix, granularity), jnp.float32)
    p_prune = jax.nn.softmax(prune_logits.astype(jnp.float32))
    p_merge = jax.nn.softmax(merge_logits.astype(jnp.float32))
    kept = _ste_ceil(jnp.sum(counts * p_prune))
    keep_m = jnp.minimum(_ste_ceil(jnp.sum(counts * p_merge)), kept)
    order = sort_order(importance, prefix, tokens.mask)
    rank = jnp.arange(n, dtype=jnp.int32)[None]
    real = jnp.ones((batch, n), bool) if tokens.mask is None else jnp.take_along_axis(tokens.mask, order, 1)
    metric_sorted = jnp.take_along_axis(jax.lax.stop_gradient(metric), order[..., None], axis=1)
    dest, sim = _destinations(metric_sorted, (rank < keep_m) & (rank < keep) & real, prefix)
    is_dest = rank < keep_m
    source = ~is_dest & (rank < kept) & (rank < keep)
    assign = jnp.where(is_dest, rank, jnp.where(source, dest, -1))
    size_weight = jnp.where(source, sim, 1.0)
    out, new = state_lib.reduce(x, tokens, _to_original(order, assign), keep,
                                weights=jnp.ones((batch, n), jnp.float32),
                                size_weights=_to_original(order, size_weight))
    slot = jnp.arange(keep, dtype=jnp.float32)
    hard = (slot < keep_m).astype(jnp.float32)
    soft = (jnp.sum(p_prune * (counts[None] > slot[:, None]), axis=1)
            * jnp.sum(p_merge * (counts[None] > slot[:, None]), axis=1))
    gate = hard + soft - jax.lax.stop_gradient(soft)
    out = (out.astype(jnp.float32) * gate[None, :, None]).astype(x.dtype)
    mask = jnp.broadcast_to(hard > 0, (batch, keep))
    if new.mask is not None:
        mask = mask & new.mask
    count = keep_m if tokens.count is None else jnp.minimum(keep_m, tokens.count)
    return out, new.replace(mask=mask, count=count), (kept, keep_m)


class Reducer(nn.Module):
    """DiffRate after the block's attention: prune and merge to ``keep`` tokens (or, learned, a masked capacity).

    ``prune_share``: the share of removals pruned when no published schedule is given; ``prune_kept`` and
    ``merge_kept``: a published per-layer schedule (see ``schedule``); ``learned``: the rate proxies;
    ``granularity``: their candidate step."""

    prune_share: float = 0.5
    prune_kept: tuple | None = None
    merge_kept: tuple | None = None
    learned: bool = False
    granularity: int = 4

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        importance = _ranking.cls_importance(stats)
        if not self.learned:
            pruned = pruned_count(x.shape[1], keep, tokens.source.shape[1], self.prune_kept, self.merge_kept,
                                  self.prune_share)
            return prune_merge(x, tokens, importance, x, keep, pruned, prefix)
        size = len(candidates(keep, prefix, self.granularity))
        prune_logits = self.param("prune_logits", nn.initializers.zeros, (size,), jnp.float32)
        merge_logits = self.param("merge_logits", nn.initializers.zeros, (size,), jnp.float32)
        x, tokens, kept = learned_prune_merge(x, tokens, importance, x, keep, prune_logits, merge_logits, prefix,
                                              self.granularity)
        self.sow("intermediates", "diffrate_kept", jnp.stack(kept))
        return x, tokens

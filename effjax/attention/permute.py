"""Permutation wrappers: softmax within equal-size groups of tokens taken in a given order, then un-permuted.

One mechanism serves the grouped methods: ``sliced_group`` (SReT: contiguous or randomly permuted groups),
``subregion`` (E-MMDiT ASA: round-robin chunks), ``flat_window`` (FlatFormer: window snake order) and
``attention_tile`` (frames as groups, plus shared global frames). Tokens are gathered into the order, reshaped
to ``[batch * groups, group_size, heads, head_dim]`` and attended with ``softmax.attend`` (cost O(N g) rather
than O(N^2)); the result is gathered back with ``jnp.argsort(order)``, never scattered. ``histogram`` reuses
``gather`` and ``inverse``. Under ``impl="pallas"`` the gathered groups go through the flash kernel
(``kernels.flash_attention``) as a batch of ``batch * groups`` short sequences: dense flash per group is the
block-diagonal pattern without a block table.
"""

import jax.numpy as jnp
import numpy as np

from effjax.attention import softmax
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl


def gather(x, order):
    """``x [batch, length, ...]`` taken along the length axis in ``order``: [length], [batch, length] or any
    leading part of x's shape (e.g. a per-channel order [batch, length, heads, head_dim])."""
    order = jnp.asarray(order)
    if order.ndim == 1:
        return jnp.take(x, order, axis=1)
    index = order.reshape(order.shape + (1,) * (x.ndim - order.ndim))
    return jnp.take_along_axis(x, jnp.broadcast_to(index, order.shape + x.shape[order.ndim:]), axis=1)


def inverse(order):
    """The inverse permutation along the length axis, so ``gather(gather(x, order), inverse(order)) == x``."""
    return jnp.argsort(jnp.asarray(order), axis=1 if jnp.ndim(order) > 1 else 0)


def check_permutation(method: str, order, length: int) -> None:
    """ValueError naming ``method`` unless a concrete ``order`` is a permutation of range(length)."""
    shape = np.shape(order)
    if len(shape) not in (1, 2) or shape[-1] != length:
        raise ValueError(f"{method}: order must have shape [length] or [batch, length] with length {length}, "
                         f"got {shape}.")
    try:
        concrete = np.asarray(order)
    except Exception:  # a tracer: the values are checked where they are built
        return
    if not (np.sort(concrete, axis=-1) == np.arange(length)).all():
        raise ValueError(f"{method}: order is not a permutation of range({length}).")


def softmax_in_groups(q, k, v, *, key_mask=None, query_segments=None, key_segments=None, dropout_rate=0.0,
                      dropout_rng=None):
    """Softmax attention inside each group: q ``[b, groups, gq, h, d]``, k and v ``[b, groups, gk, h, d]``.

    ``key_mask [b, groups, gk]`` (True = real key) and the segment ids ``[b, groups, gq]`` / ``[b, groups, gk]``
    restrict the keys within a group. A query whose group has no allowed key gets the uniform mean of the
    group's values (finite), as ``softmax.attend`` does. Returns ``[b, groups, gq, h, d]``.
    """
    batch, groups, gq = q.shape[:3]

    def flat(x):
        return None if x is None else x.reshape((batch * groups,) + x.shape[2:])

    pair = None
    if query_segments is not None:
        pair = (flat(query_segments)[:, :, None] == flat(key_segments)[:, None, :])[:, None]
    out = softmax.attend(flat(q), flat(k), flat(v), mask=flat(key_mask), pair_mask=pair, dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng)
    return out.reshape(batch, groups, gq, *q.shape[3:])


def group_size_for(method: str, length: int, group_size: int, *, pad: bool = False) -> int:
    """The padded length for ``group_size``; ValueError naming ``method`` for a bad size or, unless ``pad``, a
    length that is not a multiple of it."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"{method}: group size must be a positive int, got {group_size!r}.")
    if length % group_size and not pad:
        raise ValueError(f"{method}: sequence length {length} is not divisible by the group size {group_size}.")
    return -(-length // group_size) * group_size


def attend_in_groups(q, k, v, *, group_size: int, method: str, order=None, mask=None, segment_ids=None, pad=False,
                     dropout_rate=0.0, dropout_rng=None, impl="xla"):
    """Softmax within consecutive runs of ``group_size`` tokens of the sequence taken in ``order``, un-permuted.

    Self-attention only (the caller refuses cross attention). ``order`` ([length] or [batch, length], None =
    identity) is the permutation applied before grouping. With ``pad=True`` a length that is not a multiple
    of ``group_size`` is filled up at the end of the order with masked slots (excluded as keys, dropped from
    the output); otherwise it raises ValueError naming ``method``. Padded keys (``mask`` False) are excluded in
    every group and ``segment_ids`` restrict each group further. Other ``impl`` (``kernels.dispatch``, op
    "attention"), e.g. "pallas": each group is one sequence of the flash kernel, with the group's key mask and
    segment ids (dropout: the kernel's own draws); a query whose group has no allowed key gets the uniform mean
    of the group's values on both paths.
    """
    check_impl(method, impl)
    batch, length = q.shape[:2]
    padded = group_size_for(method, length, group_size, pad=pad)
    if order is not None:
        check_permutation(method, order, length)
    extra = padded - length
    if extra:
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (q.ndim - 2)
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        mask = jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask, bool)
        mask = jnp.pad(mask, [(0, 0), (0, extra)])
        if segment_ids is not None:
            segment_ids = jnp.pad(jnp.asarray(segment_ids), [(0, 0), (0, extra)])
        if order is not None:
            tail = jnp.arange(length, padded)
            order = jnp.asarray(order)
            tail = jnp.broadcast_to(tail, order.shape[:-1] + (extra,))
            order = jnp.concatenate([order, tail], axis=-1)
    if order is not None:
        q, k, v = (gather(x, order) for x in (q, k, v))
        mask = None if mask is None else gather(jnp.asarray(mask), order)
        segment_ids = None if segment_ids is None else gather(jnp.asarray(segment_ids), order)

    groups = padded // group_size

    def split(x, lead=(batch, groups)):
        return None if x is None else jnp.asarray(x).reshape(lead + (group_size,) + x.shape[2:])

    def xla():
        segments = split(segment_ids)
        return softmax_in_groups(split(q), split(k), split(v), key_mask=split(mask), query_segments=segments,
                                 key_segments=segments, dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    if impl == "xla":
        out = xla()
    else:  # every group one sequence of the kernel
        flat = (batch * groups,)
        call = dict(q=split(q, flat), k=split(k, flat), v=split(v, flat), mask=split(mask, flat),
                    segment_ids=split(segment_ids, flat), **softmax.kernel_dropout(dropout_rate, dropout_rng))
        out = dispatch.run("attention", impl, call, xla=xla, where=method)
    out = out.reshape((batch, padded) + out.shape[-2:])
    if order is not None:
        out = gather(out, inverse(order))
    return out[:, :length]

"""Reformer LSH attention (Kitaev, Kaiser, Levskaya, ICLR 2020, Sec. 2: shared-QK, angular LSH, sorted chunks)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout, dropout_kwargs, refuse_causal, refuse_cross

NAME = "reformer"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=False)
_DISALLOWED = -1e9  # a pair that may not attend (finite, so an all-masked padded row stays finite)
_SELF_PENALTY = 1e5  # a token attends to itself only when nothing else is allowed (Sec. 2, shared-QK)


def num_buckets_for(length: int, chunk_size: int) -> int:
    """Buckets so that one averages about a chunk of tokens, rounded up to an even count (at least 2)."""
    buckets = max(2, -(-length // chunk_size))
    return buckets + buckets % 2


def hash_buckets(x, rotations):
    """Angular LSH: argmax([xR; -xR]) for ``x [b, L, h, d]`` and ``rotations [d, rounds, buckets / 2]``.

    Returns int32 ``[b, h, rounds, L]``.
    """
    projected = jnp.einsum("blhd,drn->bhrln", x.astype(jnp.float32), rotations.astype(jnp.float32))
    return jnp.argmax(jnp.concatenate([projected, -projected], axis=-1), axis=-1).astype(jnp.int32)


def _chunks_with_lookback(x, num_chunks: int):
    """[..., L, f] -> [..., chunks, c, f] queries and [..., chunks, 2c (or c), f] keys: a chunk and the one before."""
    chunked = x.reshape(*x.shape[:-2], num_chunks, x.shape[-2] // num_chunks, x.shape[-1])
    if num_chunks == 1:
        return chunked, chunked
    previous = jnp.roll(chunked, 1, axis=-3)
    return chunked, jnp.concatenate([chunked, previous], axis=-2)


def attend(q, k, v, rotations, *, mask=None, segment_ids=None, causal=False, chunk_size=64, dropout_rate=0.0,
           dropout_rng=None):
    """Shared-QK LSH attention over [batch, length, heads, head_dim] inputs; ``k`` is not used.

    Keys are the unit-normalized queries (shared-QK, Sec. 2). Each of ``rotations.shape[1]`` hashing rounds
    sorts tokens by (bucket, position), splits them into chunks of ``chunk_size`` and lets every query attend
    to the keys of its own bucket in its chunk and the previous one (padding sorted last and each segment
    apart, so their content cannot move a token's chunk); a token attends to itself only when no
    other key is allowed. Rounds are combined with weights softmax(logsumexp of each round's scores) (Sec. 2,
    multi-round LSH), without the paper's correction for pairs found by several rounds. Key padding and
    ``segment_ids`` restrict the pairs. The length must be a multiple of the chunk size. Causal is refused
    (see the error's reason).
    """
    check_qkv(NAME, q, k, v)
    refuse_cross(NAME, q, k, "keys are the queries themselves (shared-QK).")
    refuse_causal(NAME, causal, "which earlier keys share a query's chunk depends on how many later tokens hash "
                  "into earlier buckets (they shift the chunk boundaries), so a causal mask alone would still leak.")
    batch, length, heads, head_dim = q.shape
    if rotations.ndim != 3 or rotations.shape[0] != head_dim:
        raise ValueError(f"{NAME}: rotations must have shape [head_dim={head_dim}, rounds, buckets / 2], "
                         f"got {rotations.shape}.")
    chunk = min(chunk_size, length)
    if length % chunk:
        raise ValueError(f"{NAME}: sequence length {length} is not divisible by chunk_size {chunk_size}; "
                         f"pad the length to a multiple of {chunk_size}.")
    num_chunks, rounds = length // chunk, rotations.shape[1]

    q32, v32 = q.astype(jnp.float32), v.astype(jnp.float32)
    keys = q32 / (jnp.linalg.norm(q32, axis=-1, keepdims=True) + 1e-6)
    buckets = hash_buckets(q32, rotations)  # [b, h, r, L]
    positions = jnp.arange(length, dtype=jnp.int32)
    real = jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask).astype(bool)
    segments = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    # Padding sorts last and each segment apart, so neither padded nor other segments' content can move a
    # token's chunk; within them, by bucket then position.
    per_token = lambda x: jnp.broadcast_to(x[:, None, None, :], buckets.shape)  # noqa: E731
    order = jnp.lexsort((jnp.broadcast_to(positions, buckets.shape), buckets, per_token(segments),
                         per_token(~real)), axis=-1)

    def sort(x):  # [b, L, h, f] -> [b, h, r, L, f] in each round's order
        x = jnp.moveaxis(x, 2, 1)[:, :, None]
        return jnp.take_along_axis(x, order[..., None], axis=3)

    info = jnp.stack([jnp.broadcast_to(positions, (batch, length)), real.astype(jnp.int32),
                      segments.astype(jnp.int32)], axis=-1)  # [b, L, 3]
    info = jnp.broadcast_to(info[:, :, None], (batch, length, heads, 3))
    sorted_buckets = jnp.take_along_axis(buckets, order, axis=-1)[..., None]
    sorted_info = jnp.concatenate([sort(info), sorted_buckets], axis=-1)  # position, real, segment, bucket

    q_chunks, _ = _chunks_with_lookback(sort(q32), num_chunks)
    _, k_ctx = _chunks_with_lookback(sort(keys), num_chunks)
    _, v_ctx = _chunks_with_lookback(sort(v32), num_chunks)
    q_info, k_info = _chunks_with_lookback(sorted_info, num_chunks)

    scores = jnp.einsum("bhrcid,bhrcjd->bhrcij", q_chunks, k_ctx) / jnp.sqrt(jnp.float32(head_dim))
    qi, kj = q_info[..., :, None, :], k_info[..., None, :, :]
    allowed = (qi[..., 3] == kj[..., 3]) & (kj[..., 1] == 1) & (qi[..., 2] == kj[..., 2])
    is_self = qi[..., 0] == kj[..., 0]
    logits = jnp.where(allowed, scores - _SELF_PENALTY * is_self, _DISALLOWED)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - lse)
    weights = dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("bhrcij,bhrcjd->bhrcid", weights, v_ctx).reshape(batch, heads, rounds, length, head_dim)
    lse = lse.reshape(batch, heads, rounds, length, 1)

    undo = jnp.argsort(order, axis=-1)[..., None]  # gather back to positions (never scatter)
    out, lse = jnp.take_along_axis(out, undo, axis=3), jnp.take_along_axis(lse, undo, axis=3)
    round_weights = jax.nn.softmax(lse, axis=2)
    combined = jnp.sum(round_weights * out, axis=2)  # [b, h, L, d]
    return jnp.moveaxis(combined, 1, 2).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; owns ``frozen_rotations [head_dim, num_hashes, num_buckets / 2]``.

    The rotations are drawn from the ``params`` stream at init and never trained; with ``redraw=True`` they
    are redrawn from the ``random`` stream whenever ``deterministic=False`` (the paper draws new ones at
    every step; here that is opt-in, as for Performer). ``num_buckets=None`` sizes the buckets from the
    length at init so that a bucket averages one chunk. ``num_hashes=2`` and ``chunk_size=64`` are our
    defaults (the paper compares 1-8 rounds).
    """

    num_hashes: int = 2
    chunk_size: int = 64
    num_buckets: int | None = None
    redraw: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        buckets = self.num_buckets or num_buckets_for(q.shape[1], min(self.chunk_size, q.shape[1]))
        if buckets < 2 or buckets % 2:
            raise ValueError(f"{NAME}: num_buckets must be even and >= 2, got {buckets}.")
        if self.num_hashes < 1:
            raise ValueError(f"{NAME}: num_hashes must be >= 1, got {self.num_hashes}.")
        shape = (q.shape[-1], self.num_hashes, buckets // 2)
        rotations = self.param("frozen_rotations", nn.initializers.normal(1.0), shape, jnp.float32)
        if self.redraw and not deterministic:
            rotations = jax.random.normal(self.make_rng("random"), shape, jnp.float32)
        return attend(q, k, v, jax.lax.stop_gradient(rotations), mask=mask, segment_ids=segment_ids,
                      causal=causal, chunk_size=self.chunk_size, **dropout_kwargs(self, deterministic))

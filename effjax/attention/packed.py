"""Padding-free packed attention, ByteTransformer (Zhai et al. 2023, arXiv:2210.03052, Sec. 4, Fig. 4)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs

NAME = "packed"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=True, dropout=True, pallas=False,
    decode=True, extend=True,
    notes="cross attention with segment_ids is refused (it would need separate query and key segment ids). Decoding "
          "(one sequence per row, no segment_ids: softmax with the padding mask) keeps a key/value cache of "
          "max_length slots.",
)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, dropout_rate=0.0, dropout_rng=None):
    """Softmax restricted to tokens of the same segment: ``seg[i] == seg[j] != 0`` (0 = padding).

    Several sequences packed in one row attend only within themselves; ``causal`` is causal within
    each segment. Outputs at padding positions (segment id 0, or ``mask`` False) are zero, as after
    ByteTransformer's restore step. Without ``segment_ids`` this is ``softmax`` with the padding
    mask. Computed as masked O(N^2) softmax, not as a packed varlen kernel: same values, no speedup.
    """
    check_qkv(NAME, q, k, v)
    batch, length = q.shape[:2]
    if segment_ids is None:
        return softmax.attend(q, k, v, mask=mask, causal=causal, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng)
    if k.shape[1] != length:
        raise NotImplementedError(
            f"{NAME}: cross attention with segment_ids (q_len {length} != kv_len {k.shape[1]}) is not "
            "supported: it needs separate query and key segment ids."
        )
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
        raise ValueError(f"{NAME}: segment_ids must have shape [batch, length] = {(batch, length)}, "
                         f"got {segment_ids.shape}.")
    out = softmax.attend(q, k, v, mask=mask, causal=causal, pair_mask=patterns.same_segment(segment_ids)[:, None],
                         dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    real = segment_ids != 0
    if mask is not None:
        real = real & jnp.asarray(mask, bool)
    return jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))


class Attention(nn.Module):
    """Linen wrapper of ``attend``; the method has no parameters of its own."""

    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The key/value cache of ``max_length`` slots (``effjax.attention.decoding``), as softmax's."""
        return decoding.kv_init(batch, max_length, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``; decoding takes one sequence per row (no ``segment_ids``)."""
        def forward():
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                          **dropout_kwargs(self, deterministic))

        if cache is None:
            return forward()
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        return decoding.kv_decode(NAME, q, k, v, cache, positions, mask, forward=forward)

"""ESSAformer (Zhang et al., ICCV 2023) ESSA: SCC-kernel attention out = V + q2 (k2^T V) / sqrt(N), as in ESSA.py."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, l2_normalize, refuse_causal, refuse_cross, refuse_segments

NAME = "essa"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=False)
SQUARE_EPS = 1e-7  # the official code's eps in q^2 / (sum_c q^2 + eps)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def _squared_share(x):
    """Centre over channels, square, divide by the channel sum: (x - mean_c x)^2 / (sum_c (x - mean_c x)^2 + eps)."""
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x2 = x * x
    return x2 / (jnp.sum(x2, axis=-1, keepdims=True) + SQUARE_EPS)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False):
    """ESSA per head: ``v_i + q2_i (sum_j k2_j v_j^T) / sqrt(N)`` with the SCC features of the official code.

    ``q2`` is the centred, squared, channel-normalized query, L2-normalized over channels; ``k2`` the same
    for keys but L2-normalized over the tokens (per channel), after zeroing padded keys; N counts the real
    keys. The paper is single-head over all C channels; here each head is one ESSA over its head_dim.
    Causal, cross attention and segment_ids raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "k2 is L2-normalized over all tokens, so every output reads future keys.")
    refuse_cross(NAME, q, k, "the identity term adds v at the query positions, so q and v must be the same tokens.")
    refuse_segments(NAME, segment_ids, "k2 is L2-normalized over all tokens of the row, across segments.")
    batch, length = k.shape[:2]
    mask = check_mask(NAME, mask, batch, length)
    q2 = l2_normalize(_squared_share(q), axis=-1, eps=NORMALIZE_EPS)
    k2 = _squared_share(k)
    if mask is None:
        count = jnp.full((batch,), float(length), jnp.float32)
    else:
        k2 = jnp.where(mask[:, :, None, None], k2, 0.0)
        count = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.float32), 1.0)
    k2 = l2_normalize(k2, axis=1, eps=NORMALIZE_EPS)
    t2 = ka.linear_attention(q2, k2, v, mask=mask, method=NAME) / jnp.sqrt(count)[:, None, None, None]
    return (v.astype(jnp.float32) + t2).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters (the qkv and output Linear layers are the model's).

    ``dropout_rate`` is accepted for the common interface but does not apply (no weights are materialized).
    """

    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal)

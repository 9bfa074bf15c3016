"""Linear Transformer (Katharopoulos et al., ICML 2020, Eq. 6 with phi(x) = elu(x) + 1 of Eq. 7)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "linear_elu"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=True)


def feature_map(x):
    """phi(x) = elu(x) + 1 (fast-transformers' ``elu_feature_map``), in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, chunk_size=ka.DEFAULT_CHUNK_SIZE, impl="xla"):
    """``phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j))`` over visible real keys j.

    No 1/sqrt(d) scaling (the paper has none). ``causal=True`` uses chunked prefix sums of
    ``chunk_size`` positions. ``segment_ids`` raise NotImplementedError. ``impl="pallas"`` runs the chunked
    linear attention kernel (``kernels.linear_attention``).
    """
    check_qkv(NAME, q, k, v)
    ka.refuse_segments(NAME, segment_ids)
    out = ka.normalized_attention(feature_map(q), feature_map(k), v, mask=mask, causal=causal,
                                  chunk_size=chunk_size, method=NAME, impl=impl)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters.

    ``dropout_rate`` is accepted for the common interface but does not apply: the attention weights are
    never materialized, so there is nothing to drop (the paper uses no attention dropout either).
    """

    chunk_size: int = ka.DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, chunk_size=self.chunk_size,
                      impl=self.impl)

"""Linear Transformer (Katharopoulos et al., ICML 2020, Eq. 6 with phi(x) = elu(x) + 1 of Eq. 7)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "linear_elu"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=True,
                            decode=True, extend=True,
                            notes="decoding keeps the running sums sum phi(k) v^T [heads, head_dim, head_dim] and "
                                  "sum phi(k) [heads, head_dim] in float32, constant in the context length.")


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

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The running sums ``kernel_attention.state_init`` (float32, whatever ``dtype``; ``max_length`` unused)."""
        return ka.state_init(batch, heads, head_dim, head_dim)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        def forward():
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, chunk_size=self.chunk_size,
                          impl=self.impl)

        if cache is None:
            return forward()
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        ka.check_self_attention(NAME, q, k)
        out, cache = ka.decode(NAME, cache, feature_map(q), feature_map(k), v, positions, mask, forward=forward)
        return out.astype(q.dtype), cache

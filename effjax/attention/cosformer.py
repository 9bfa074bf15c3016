"""cosFormer (Qin et al., ICLR 2022), cos-reweighted ReLU attention: relu(q_i).relu(k_j) cos(pi (i-j) / 2M)."""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "cosformer"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=True)


def _reweighted(x, horizon):
    """[relu(x_i) sin(pi i / 2M), relu(x_i) cos(pi i / 2M)] with 1-based i: [b, l, h, 2d] in float32."""
    x = jax.nn.relu(x.astype(jnp.float32))
    angle = (math.pi / (2.0 * horizon)) * jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)
    angle = angle[None, :, None, None]
    return jnp.concatenate([x * jnp.sin(angle), x * jnp.cos(angle)], axis=-1)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, max_len=None,
           chunk_size=ka.DEFAULT_CHUNK_SIZE, impl="xla"):
    """``sum_j relu(q_i).relu(k_j) cos(pi (i - j) / 2M) v_j / sum_j relu(q_i).relu(k_j) cos(...)``.

    As in the official code, positions are 1-based per sequence and M = max(q_len, kv_len), the
    **padded** lengths (so the re-weighting depends on how far a batch is padded, never on the padded
    values). ``max_len`` fixes M instead (e.g. for causal decoding); it must be >= both lengths so that
    every cos weight stays positive. The cos re-weighting is computed exactly as one kernel attention
    with features [phi sin, phi cos] (Ptolemy: cos(a - b) = cos a cos b + sin a sin b).
    ``segment_ids`` raise NotImplementedError. ``impl="pallas"`` runs ``kernels.linear_attention``.
    """
    check_qkv(NAME, q, k, v)
    ka.refuse_segments(NAME, segment_ids)
    longest = max(q.shape[1], k.shape[1])
    if max_len is None:
        horizon = longest
    elif not isinstance(max_len, int) or max_len < longest:
        raise ValueError(f"{NAME}: max_len (M) must be an int >= max(q_len, kv_len) = {longest}, got {max_len!r}.")
    else:
        horizon = max_len
    out = ka.normalized_attention(_reweighted(q, horizon), _reweighted(k, horizon), v, mask=mask, causal=causal,
                                  chunk_size=chunk_size, method=NAME, impl=impl)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters.

    ``max_len`` None means M = max(q_len, kv_len) as in the paper's code. ``dropout_rate`` is accepted
    for the common interface but does not apply: the attention weights are never materialized.
    """

    max_len: int | None = None
    chunk_size: int = ka.DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, max_len=self.max_len,
                      chunk_size=self.chunk_size, impl=self.impl)

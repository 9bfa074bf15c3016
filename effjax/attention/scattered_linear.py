"""ScatterFormer (He et al., ECCV 2024) scattered linear attention: ReLU kernel attention per variable-length group."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, refuse_causal

NAME = "scattered_linear"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=True, dropout=False, pallas=False)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False):
    """``relu(q_i) KV_w / (relu(q_i) . s_w + 1e-6)`` with ``KV_w = sum_{j in w} relu(k_j) v_j^T`` over the real
    keys j of query i's group w = ``segment_ids[i]``; without ``segment_ids`` the row is one group.

    Groups need not be contiguous and ids are only compared for equality (``kernel_attention`` sums the
    per-token outer products with ``segment_sum``). ``causal=True`` raises NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the paper's per-window sums cover whole windows; a segmented prefix scan "
                                "is not implemented.")
    phi_q, phi_k = (jax.nn.relu(x.astype(jnp.float32)) for x in (q, k))
    out = ka.normalized_attention(phi_q, phi_k, v, mask=mask, segment_ids=segment_ids, method=NAME)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters.

    ``dropout_rate`` is accepted for the common interface but does not apply: the attention weights are
    never materialized.
    """

    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal)

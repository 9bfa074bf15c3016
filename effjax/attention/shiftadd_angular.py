"""ShiftAddViT binary linear angular attention (You et al., NeurIPS 2023, Sec. 4.1 [mem]): 0.5v + Q_b(K_b^T V)/pi."""

import math

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, l2_normalize, refuse_causal, refuse_cross

NAME = "shiftadd_angular"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=False)


def binarize(x):
    """1[x~ - mean_d(x~) > 0] with x~ = x / |x|, and the straight-through gradient of clip(x~, 0, 1).

    The mean is over each token's own head_dim (the reference subtracts one mean over the whole tensor).
    """
    unit = l2_normalize(x)
    hard = (unit - jnp.mean(unit, axis=-1, keepdims=True) > 0).astype(unit.dtype)
    soft = jnp.clip(unit, 0.0, 1.0)
    return soft + lax.stop_gradient(hard - soft)


def token_conv(v, kernel):
    """Per-head 1-D conv along the tokens, shared over head_dim, zero padding: ``v [b, l, h, d]``, ``kernel [k, h]``."""
    size = kernel.shape[0]
    pad = size // 2
    padded = jnp.pad(v, [(0, 0), (pad, size - 1 - pad), (0, 0), (0, 0)])
    length = v.shape[1]
    return sum(padded[:, t:t + length] * kernel[t][None, None, :, None] for t in range(size))


def attend(q, k, v, res_kernel=None, *, mask=None, segment_ids=None, causal=False, normalize=True):
    """``L2norm(0.5 v_i + (1/pi) sum_j (q_b,i . k_b,j) v_j) + Conv_tokens(v)_i`` over real keys j.

    ``q_b, k_b`` are ``binarize(q), binarize(k)`` ({0, 1} per channel); ``K_b^T V`` is summed first, so the
    cost is linear in the length. ``normalize=False`` leaves out the per-token L2 norm, ``res_kernel=None``
    the residual depthwise conv ``[k, heads]`` along the token axis. Keys and values at padded positions
    (``mask`` False) are zeroed before every sum and the conv. Causal, cross attention and ``segment_ids``
    raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the residual conv along the tokens is two-sided (as in the paper, whose "
                  "attention is bidirectional).")
    refuse_cross(NAME, q, k, "the 0.5 v term and the token conv add the value of the query's own position.")
    ka.refuse_segments(NAME, segment_ids)
    batch, length, heads, _ = q.shape
    mask = check_mask(NAME, mask, batch, length)
    q_b, k_b = binarize(q.astype(jnp.float32)), binarize(k.astype(jnp.float32))
    values = v.astype(jnp.float32)
    if mask is not None:
        k_b = jnp.where(mask[:, :, None, None], k_b, 0.0)
        values = jnp.where(mask[:, :, None, None], values, 0.0)
    state = jnp.einsum("blhm,blhd->bhmd", k_b, values)
    out = 0.5 * values + jnp.einsum("blhm,bhmd->blhd", q_b, state) / math.pi
    if normalize:
        out = l2_normalize(out)
    if res_kernel is not None:
        if res_kernel.ndim != 2 or res_kernel.shape[1] != heads:
            raise ValueError(f"{NAME}: res_kernel must have shape [k, heads = {heads}], got {res_kernel.shape}.")
        out = out + token_conv(values, res_kernel.astype(jnp.float32))
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning the residual token conv ``[res_kernel_size, heads]`` (the reference's ``dconv``).

    ``res_kernel_size`` 9 as in the reference; init normal with std sqrt(2 / res_kernel_size) (the
    reference's conv init, fan_out = k). ``dropout_rate`` is accepted for the common interface but does not
    apply: attention weights are never materialized. The binarization has no parameters.
    """

    res_kernel_size: int = 9
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        if self.res_kernel_size < 1 or self.res_kernel_size % 2 == 0:
            raise ValueError(f"{NAME}: res_kernel_size must be a positive odd int, got {self.res_kernel_size}.")
        init = nn.initializers.normal(math.sqrt(2.0 / self.res_kernel_size))
        kernel = self.param("res_kernel", init, (self.res_kernel_size, q.shape[2]), jnp.float32)
        return attend(q, k, v, kernel, mask=mask, segment_ids=segment_ids, causal=causal)


"""RALA (Fan, Huang, He, CVPR 2025): rank-augmented linear attention, the core of RALA.py GateLinearAttentionNoSilu."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import grid as grids
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, refuse_causal, refuse_cross, refuse_segments
from effjax.kernels.backend import check_impl
from effjax.kernels.numerics import guarded_divide

NAME = "rala"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=True)
LEPE_KERNEL_SIZE = 5  # nn.Conv2d(dim, dim, 5, 1, 2, groups=dim) in the official code
_NO_WEIGHT = float(jnp.finfo(jnp.float32).min)  # logit of padded keys; finite so an all-padded row gives no NaN


def feature_map(x):
    """phi(x) = elu(x) + 1, float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def key_weights(phi_q, phi_k, mask=None):
    """alpha_j = softmax_j(d^{-1/2} mean_i phi(q_i) . phi(k_j)) over the real keys; [b, l, h].

    The query mean runs over the real tokens (self-attention, so ``mask`` marks the queries too).
    """
    if mask is None:
        q_mean = jnp.mean(phi_q, axis=1, keepdims=True)
    else:
        real = mask[:, :, None, None].astype(jnp.float32)
        q_mean = jnp.sum(phi_q * real, axis=1, keepdims=True) / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1.0)
    logits = jnp.einsum("bohd,blhd->blh", q_mean, phi_k) * phi_k.shape[-1] ** -0.5
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, _NO_WEIGHT)
    return jax.nn.softmax(logits, axis=1)


def rope_2d(x, hw):
    """The official 2-D RoPE ``theta_shift``: pairs (2i, 2i+1) rotated by the row index (first half of the head
    dim) or the column index (second half), angles 1 / 10000^linspace(0, 1, d/4); x [b, h*w, heads, d]."""
    head_dim = x.shape[-1]
    angle = jnp.repeat(1.0 / 10000.0 ** jnp.linspace(0.0, 1.0, head_dim // 4), 2)  # [d/2]
    rows, cols = jnp.meshgrid(jnp.arange(hw[0]), jnp.arange(hw[1]), indexing="ij")
    theta = jnp.concatenate([rows.reshape(-1, 1) * angle, cols.reshape(-1, 1) * angle], axis=-1)  # [l, d]
    theta = theta[None, :, None, :]
    pairs = x.reshape(*x.shape[:-1], head_dim // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * jnp.cos(theta) + rotated * jnp.sin(theta)


def local_positional_encoding(v, kernel, bias, hw, mask=None):
    """LePE: a depthwise conv over the grid with its own kernel per channel (all heads x head_dim channels);
    padded values are zeroed first. Float32 [b, l, h, d]."""
    batch, length, heads, head_dim = v.shape
    v = v.astype(jnp.float32)
    if mask is not None:
        v = jnp.where(mask[:, :, None, None], v, 0.0)
    out = grids.depthwise_conv(v.reshape(batch, length, heads * head_dim), kernel, hw, bias)
    return out.reshape(v.shape)


def attend(q, k, v, lepe_kernel=None, lepe_bias=None, *, mask=None, segment_ids=None, causal=False, grid=None,
           rope=True, reweight=True, impl="xla"):
    """``RoPE(phi(q_i)) sum_j alpha_j RoPE(phi(k_j)) v_j^T / (phi(q_i) . sum_j alpha_j phi(k_j)) + LePE(V)_i``.

    phi = elu + 1; ``alpha`` (``key_weights``) is the rank-augmenting re-weighting of the keys by the global
    query (``reweight=False`` gives uniform alpha = 1/N); RoPE acts on the numerator only, as in the official
    code (``rope=False`` drops it, and needs no head_dim % 4). The official ``k * alpha * N`` with its
    ``1/sqrt(N)`` pair of scalings is written here as ``alpha`` with sums. ``lepe_kernel`` [5, 5, heads *
    head_dim] adds LePE; None omits it. Causal, cross attention and segment_ids raise NotImplementedError.
    ``impl="pallas"`` runs the numerator (with ``rope``; else the whole normalized attention) through
    ``kernels.linear_attention``; the denominator phi(q_i) . sum_j alpha_j phi(k_j), the key weights, RoPE and
    LePE stay plain JAX (each O(N d)).
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    refuse_causal(NAME, causal, "the key weights use the mean of all queries and a softmax over all keys, and "
                                "RoPE and LePE span the 2-D grid.")
    refuse_cross(NAME, q, k, "the query mean, RoPE and LePE place queries and keys on the same grid.")
    refuse_segments(NAME, segment_ids, "the global query mean and the key softmax span the whole row.")
    batch, length, heads, head_dim = q.shape
    hw = grids.infer(NAME, length, grid)
    mask = ka.check_mask(NAME, mask, batch, length)
    if rope and head_dim % 4:
        raise ValueError(f"{NAME}: the 2-D RoPE needs head_dim divisible by 4, got {head_dim} (or rope=False).")
    phi_q, phi_k = feature_map(q), feature_map(k)
    if reweight:
        phi_k = phi_k * key_weights(phi_q, phi_k, mask)[..., None]
    else:
        count = length if mask is None else jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None, None, None]
        phi_k = phi_k / count
    if rope:
        num = ka.linear_attention(rope_2d(phi_q, hw), rope_2d(phi_k, hw), v, mask=mask, method=NAME, impl=impl)
        ones = jnp.ones((batch, length, heads, 1), jnp.float32)
        den = ka.linear_attention(phi_q, phi_k, ones, mask=mask, method=NAME)
        out = guarded_divide(num, den[..., 0], ka.EPS)
    else:
        out = ka.normalized_attention(phi_q, phi_k, v, mask=mask, method=NAME, impl=impl)
    if lepe_kernel is not None:
        if lepe_kernel.ndim != 3 or lepe_kernel.shape[2] != heads * head_dim:
            raise ValueError(f"{NAME}: lepe_kernel must have shape [kh, kw, heads * head_dim={heads * head_dim}], "
                             f"got {lepe_kernel.shape}.")
        out = out + local_positional_encoding(v, lepe_kernel, lepe_bias, hw, mask)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; owns the LePE conv (``lepe_kernel [5, 5, heads * head_dim]``, truncated
    normal std 0.02, and ``lepe_bias`` zeros, as RAVLT initialises its convs) unless ``lepe=False``.

    Not here: the output gate ``o`` (a fourth 1x1 projection of x, multiplied into ``res + LePE``) and the
    output projection, which need the block input x rather than q, k, v. ``grid=(h, w)`` for non-square
    lengths. ``dropout_rate`` is accepted for the common interface but does not apply.
    """

    rope: bool = True
    lepe: bool = True
    grid: tuple | None = None
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention for the attention product

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        kernel = bias = None
        if self.lepe:
            channels = q.shape[2] * q.shape[3]
            kernel = self.param("lepe_kernel", nn.initializers.truncated_normal(0.02),
                                (LEPE_KERNEL_SIZE, LEPE_KERNEL_SIZE, channels))
            bias = self.param("lepe_bias", nn.initializers.zeros, (channels,))
        return attend(q, k, v, kernel, bias, mask=mask, segment_ids=segment_ids, causal=causal, grid=self.grid,
                      rope=self.rope, impl=self.impl)

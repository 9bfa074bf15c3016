"""SLAB (Guo et al., ICML 2024) simplified linear attention: SLA(Q, K, V) = Norm(ReLU(Q) ReLU(K)^T) V + DWC(V)."""


import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import grid as grids
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, refuse_causal, refuse_cross, refuse_segments, torch_uniform

NAME = "slab_sla"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=True)
KERNEL_SIZE = 5  # MODEL.LA.KERNEL_SIZE in the SLAB configs


def value_conv(v, kernel, bias, hw, mask=None):
    """DWC(V): one depthwise conv ``kernel [kh, kw, head_dim]`` (+ ``bias``) shared by all heads, over the
    ``hw`` grid with zero 'same' padding; padded values are zeroed first. Float32 [b, l, h, d]."""
    batch, length, heads, head_dim = v.shape
    v = v.astype(jnp.float32)
    if mask is not None:
        v = jnp.where(mask[:, :, None, None], v, 0.0)
    per_head = jnp.swapaxes(v, 1, 2).reshape(batch * heads, length, head_dim)  # heads ride on the batch
    out = grids.depthwise_conv(per_head, kernel, hw, bias)
    return jnp.swapaxes(out.reshape(batch, heads, length, head_dim), 1, 2)


def attend(q, k, v, dwc_kernel, dwc_bias=None, *, mask=None, segment_ids=None, causal=False, grid=None,
           impl="xla"):
    """``relu(q_i) sum_j relu(k_j) v_j^T / (relu(q_i) . sum_j relu(k_j) + 1e-6) + DWC(V)_i`` over real keys j.

    The sequence is laid out row-major on ``grid`` (default: the square grid). The DWC mixes positions in
    2-D both ways, so causal, cross attention and segment_ids raise NotImplementedError. ``impl="pallas"`` runs
    the ReLU attention through ``kernels.linear_attention`` (the DWC stays a plain-JAX conv).
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the depthwise conv on V mixes grid positions in both directions.")
    refuse_cross(NAME, q, k, "DWC(V) is added at the value positions, so q and v must be the same tokens.")
    refuse_segments(NAME, segment_ids, "the depthwise conv on V mixes neighbouring grid positions of any segment.")
    hw = grids.infer(NAME, q.shape[1], grid)
    mask = check_mask(NAME, mask, q.shape[0], k.shape[1])
    if dwc_kernel.ndim != 3 or dwc_kernel.shape[2] != q.shape[-1]:
        raise ValueError(f"{NAME}: dwc_kernel must have shape [kh, kw, head_dim={q.shape[-1]}], "
                         f"got {dwc_kernel.shape}.")
    phi_q, phi_k = (jax.nn.relu(x.astype(jnp.float32)) for x in (q, k))
    out = ka.normalized_attention(phi_q, phi_k, v, mask=mask, method=NAME, impl=impl)
    return (out + value_conv(v, dwc_kernel, dwc_bias, hw, mask)).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the DWC: ``dwc_kernel [kernel_size, kernel_size, head_dim]`` and
    ``dwc_bias [head_dim]``, one conv shared by all heads as in the official code, with PyTorch's default
    Conv2d init (assumed kept by the official code's Swin-style init; not verified). ``grid=(h, w)`` for
    non-square lengths.
    ``dropout_rate`` is accepted for the common interface but does not apply (no weights are materialized).
    """

    kernel_size: int = KERNEL_SIZE
    grid: tuple | None = None
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention for the ReLU attention

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{NAME}: kernel_size must be a positive odd int, got {self.kernel_size!r}.")
        head_dim = q.shape[-1]
        init = torch_uniform(self.kernel_size**2)
        kernel = self.param("dwc_kernel", init, (self.kernel_size, self.kernel_size, head_dim))
        bias = self.param("dwc_bias", init, (head_dim,))
        return attend(q, k, v, kernel, bias, mask=mask, segment_ids=segment_ids, causal=causal, grid=self.grid,
                      impl=self.impl)

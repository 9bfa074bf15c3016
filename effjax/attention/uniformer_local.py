"""UniFormer local MHRA (Li et al., ICLR 2022, Sec. 3.2 [mem]): A_local(i, j) = a_{i-j}, a 5x5 depthwise conv of V."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import grid as grid_lib
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, refuse_causal, refuse_cross, refuse_segments

NAME = "uniformer_local"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=False)




def attend(q, k, v, kernel, bias=None, *, mask=None, segment_ids=None, causal=False, grid=None):
    """``DWConv(v)`` on the ``grid`` of the sequence: every head channel is convolved with its own kernel.

    ``kernel`` is ``[kh, kw, heads * head_dim]`` (odd sizes), ``bias`` ``[heads * head_dim]``; zero 'SAME'
    padding at the grid border. q and k are checked but not used: the local affinity a_{i-j} is a learned
    parameter, not a function of the tokens. Values at padded positions (``mask`` False) are zeroed before
    the conv, so they cannot reach a real output. Self-attention on one grid only: causal, cross attention
    and ``segment_ids`` raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the 2-D depthwise conv reads neighbours below and to the right.")
    refuse_cross(NAME, q, k, "the conv maps each grid position of v to the same position of the output.")
    refuse_segments(NAME, segment_ids, "the conv mixes neighbouring grid cells whatever their segment.")
    batch, length, heads, head_dim = v.shape
    hw = grid_lib.infer(NAME, length, grid)
    mask = check_mask(NAME, mask, batch, length)
    channels = heads * head_dim
    if kernel.ndim != 3 or kernel.shape[2] != channels or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"{NAME}: kernel must have shape [odd kh, odd kw, heads * head_dim = {channels}], "
                         f"got {kernel.shape}.")
    values = v.astype(jnp.float32)
    if mask is not None:
        values = jnp.where(mask[:, :, None, None], values, 0.0)
    out = grid_lib.depthwise_conv(values.reshape(batch, length, channels), kernel, hw, bias)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning the depthwise kernel ``[kernel_size, kernel_size, heads * head_dim]`` and its bias.

    ``kernel_size`` 5 is the paper's 2-D local MHRA; the kernel uses PyTorch's default conv init (the
    reference's ``nn.Conv2d``), the bias starts at zero; both are sized from the input at init. ``grid`` is the
    (height, width) of the sequence; None takes the square root of the length. ``dropout_rate`` is accepted for
    the common interface but does not apply: there are no attention weights to drop.
    """

    kernel_size: int = 5
    grid: tuple | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{NAME}: kernel_size must be a positive odd int, got {self.kernel_size}.")
        channels = v.shape[2] * v.shape[3]
        size = self.kernel_size
        kernel = self.param("kernel", grid_lib.DEPTHWISE_INIT, (size, size, channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return attend(q, k, v, kernel, bias, mask=mask, segment_ids=segment_ids, causal=causal, grid=self.grid)

"""Block-local attention, MASFormer's sparse layers (Zhang et al. 2023, "MASFormer", Sec. 3, Fig. 1)."""

import numpy as np
from flax import linen as nn

from effjax.attention import patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs
from effjax.kernels.backend import check_impl
from effjax.kernels.block_sparse import method_blocks_attention

NAME = "block_local"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=False, dropout=True, pallas=True)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, block_size=64, dropout_rate=0.0,
           dropout_rng=None, impl="xla"):
    """Softmax within non-overlapping blocks of ``block_size`` tokens (block-diagonal mask).

    ``causal`` adds the causal mask inside each block. A block_size >= the length is clamped to one
    block (full attention); otherwise a length that is not a multiple raises ValueError.
    Self-attention only. ``impl="xla"``: masked O(N^2) softmax, exact, not faster than ``softmax``.
    Other ``impl`` (``kernels.dispatch``), e.g. "pallas": the block-sparse kernel computing only the diagonal
    blocks (Triton's needs a power-of-two block); dropout with the kernel's own draws.
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    length = q.shape[1]
    if k.shape[1] != length:
        raise NotImplementedError(
            f"{NAME}: cross attention (q_len {length} != kv_len {k.shape[1]}) is not supported: "
            "blocks are positions of one sequence."
        )
    block, count = patterns.num_blocks(NAME, length, block_size)

    def xla():
        pair = patterns.block_diagonal(length, block)
        return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                              pair_mask=pair[None, None], dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    if impl == "xla":
        return xla()
    return method_blocks_attention(NAME, impl, q, k, v, np.eye(count, dtype=bool), block, xla=xla, mask=mask,
                                   segment_ids=segment_ids, causal=causal,
                                   **softmax.kernel_dropout(dropout_rate, dropout_rng))


class Attention(nn.Module):
    """Linen wrapper of ``attend``; block_size 64 is effjax's choice (the paper's b is unverified)."""

    block_size: int = 64
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": block-sparse kernel over the diagonal blocks only

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, block_size=self.block_size,
                      impl=self.impl, **dropout_kwargs(self, deterministic))

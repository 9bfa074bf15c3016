"""Block-local attention, MASFormer's sparse layers (Zhang et al. 2023, "MASFormer", Sec. 3, Fig. 1)."""

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import decoding, patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs
from effjax.kernels.backend import check_impl
from effjax.kernels.block_sparse import method_blocks_attention

NAME = "block_local"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=False, dropout=True, pallas=True,
                            decode=True, extend=True,
                            notes="causal takes any length (the last block cut short); decoding keeps a ring buffer "
                                  "of block_size keys/values (max_length if fewer), the current block's: memory "
                                  "bounded by the block, not the context.")


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, block_size=64, dropout_rate=0.0,
           dropout_rng=None, impl="xla"):
    """Softmax within non-overlapping blocks of ``block_size`` tokens (block-diagonal mask).

    ``causal`` adds the causal mask inside each block. A block_size >= the length is clamped to one
    block (full attention); otherwise a length that is not a multiple raises ValueError, except with ``causal``:
    then the last block is cut short (computed right-padded to a multiple, padding no causal output reads), so a
    causal prefix's outputs are those of any longer sequence, as decoding needs.
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
    if causal and length > block_size >= 1 and length % block_size:
        extra = -length % block_size
        real = jnp.ones((q.shape[0], length), bool) if mask is None else jnp.asarray(mask, bool)
        pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
        return attend(pad(q), pad(k), pad(v), mask=pad(real), segment_ids=pad(segment_ids), causal=True,
                      block_size=block_size, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                      impl=impl)[:, :length]
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

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """A ring buffer of ``block_size`` key/value slots (``max_length`` if fewer; ``effjax.attention.decoding``):
        the causal query at i sees its own block's keys up to i, which the last ``block_size`` positions hold."""
        if self.block_size < 1:
            raise ValueError(f"{NAME}: block_size must be >= 1, got {self.block_size}.")
        return decoding.kv_init(batch, min(self.block_size, max_length), heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        call = dict(segment_ids=segment_ids, causal=causal, block_size=self.block_size, impl=self.impl,
                    **dropout_kwargs(self, deterministic))
        if cache is None:
            return attend(q, k, v, mask=mask, **call)
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        # A query sees the keys of its own block up to itself: a window of (position % block_size) keys before it,
        # at most block_size - 1 (the prefill's window: the cache is a ring, a prompt may be longer than it).
        window = self.block_size - 1
        if positions is not None:  # a step's or an extend's tokens, each its own distance to its block's start
            window = decoding.token_positions(positions, q.shape[1]) % self.block_size
        return decoding.kv_decode(NAME, q, k, v, cache, positions, mask, window=window,
                                  forward=lambda: attend(q, k, v, mask=mask, **call))

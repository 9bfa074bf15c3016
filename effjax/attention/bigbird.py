"""BigBird ITC block-sparse attention (Zaheer et al. 2020, "Big Bird", Sec. 2 and App. D, Fig. 1)."""

import numpy as np
from flax import linen as nn

from effjax.attention import patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs
from effjax.kernels.backend import check_impl
from effjax.kernels.block_sparse import method_blocks_attention

NAME = "bigbird"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=True)


def block_layout(num_blocks: int, num_heads: int, num_random_blocks: int, seed: int) -> np.ndarray:
    """numpy bool [num_heads, num_blocks, num_blocks]: 3-block window | first/last blocks global | random.

    numpy so that the Pallas kernel gets a static layout (tight visit lists) even under jit.
    """
    ids = np.arange(num_blocks)
    window = np.abs(ids[:, None] - ids[None, :]) <= 1
    is_global = (ids == 0) | (ids == num_blocks - 1)
    random = patterns.random_blocks(num_blocks, num_random_blocks, num_heads, seed)
    return (window | is_global[:, None] | is_global[None, :])[None] | random


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, block_size=64, num_random_blocks=3, seed=0,
           dropout_rate=0.0, dropout_rng=None, impl="xla"):
    """Softmax over BigBird's block pattern, the same for every batch row, drawn per head.

    The sequence is cut into blocks of ``block_size``. Every query block sees its own and the two
    neighbouring blocks (sliding window), the first and last blocks are global (they see and are
    seen by everything), and each other query block sees ``num_random_blocks`` random key blocks
    (outside its window and the globals; fewer when fewer exist). The random layout is a fixed
    numpy function of ``seed``, not an RNG draw, so it needs no stored variable. A block_size >= the
    length is clamped to one block (full attention); otherwise a length that is not a multiple
    raises ValueError. ``impl="xla"``: masked O(N^2) softmax, exact, not faster than ``softmax``.
    Other ``impl`` (``kernels.dispatch``), e.g. "pallas": the block-sparse kernel computing only the listed
    tiles, per head (one block: the flash kernel); Triton's needs a power-of-two block; dropout with the
    kernel's own draws. The one difference: a query with no allowed key (e.g. padding) averages the
    values of its listed blocks, where the xla path averages all values.
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    length, heads = q.shape[1], q.shape[2]
    if causal:
        raise NotImplementedError(
            f"{NAME}: causal attention is not supported: the global blocks and random blocks read the future "
            "(the ITC pattern is bidirectional)."
        )
    if k.shape[1] != length:
        raise NotImplementedError(
            f"{NAME}: cross attention (q_len {length} != kv_len {k.shape[1]}) is not supported: "
            "blocks are positions of one sequence."
        )
    if num_random_blocks < 0:
        raise ValueError(f"{NAME}: num_random_blocks must be >= 0, got {num_random_blocks}.")
    block, count = patterns.num_blocks(NAME, length, block_size)
    layout = block_layout(count, heads, num_random_blocks, seed)

    def xla():
        pair = patterns.expand_blocks(layout, block)
        return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, pair_mask=pair[None],
                              dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    if impl == "xla":
        return xla()
    return method_blocks_attention(NAME, impl, q, k, v, layout, block, xla=xla, mask=mask, segment_ids=segment_ids,
                                   **softmax.kernel_dropout(dropout_rate, dropout_rng))


class Attention(nn.Module):
    """Linen wrapper of ``attend``: block 64 and 3 random blocks (the paper's and LRA's BigBird defaults).

    ``seed`` fixes the random block layout deterministically (numpy RandomState), in place of a
    layout drawn from the init RNG: the layout is static (numpy) so that the block-sparse kernel can list
    the visited blocks at trace time, which a layout in a variable collection would not allow.
    """

    block_size: int = 64
    num_random_blocks: int = 3
    seed: int = 0
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": block-sparse kernel over the listed tiles only

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, block_size=self.block_size,
                      num_random_blocks=self.num_random_blocks, seed=self.seed, impl=self.impl,
                      **dropout_kwargs(self, deterministic))

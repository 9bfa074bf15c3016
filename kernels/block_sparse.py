"""Block-sparse softmax attention in Pallas: the flash kernel (FlashAttention-2, Dao 2023) visiting only the
key blocks a block mask lists (the block-sparse FlashAttention of Dao et al. 2022, Sec. 3.3).

A boolean ``block_mask`` [heads or 1, q_blocks, k_blocks] (or [q_blocks, k_blocks]) at granularity
``block_size`` says which query-block/key-block tiles are computed, forward and backward; this serves
Longformer/BigBird/MASFormer-style layouts. It is ``softmax.attend`` with
``pair_mask = patterns.expand_blocks(block_mask, block_size)`` (see ``reference``), with the same
``mask``/``segment_ids``/``causal`` token masks inside the listed tiles. The mechanism is the one of
``kernels/flash_attention.py``: per query block a list of key blocks (a range when the rows are
contiguous, a table otherwise), per key block the transposed list for dK/dV.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kernels import flash_attention as flash
from kernels.backend import interpret_default

NAME = "block_sparse_attention"


def _block_pair(method: str, block_size) -> tuple[int, int]:
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2:
        raise ValueError(f"{method}: block_size must be an int or a (block_q, block_k) pair, got {block_size}.")
    return pair


def _layout(method: str, block_mask, heads: int, q_blocks: int, k_blocks: int):
    """The block mask as [1 or heads, q_blocks, k_blocks] bool (numpy when given concretely), checked."""
    try:
        layout = np.asarray(block_mask, bool)
    except jax.errors.TracerArrayConversionError:  # traced: stays a jax array, visited through a table
        layout = jnp.asarray(block_mask, bool)
    if layout.ndim == 2:
        layout = layout[None]
    if layout.ndim != 3 or layout.shape[1:] != (q_blocks, k_blocks) or layout.shape[0] not in (1, heads):
        raise ValueError(
            f"{method}: block_mask must have shape [1 or {heads}, {q_blocks}, {k_blocks}] (q_blocks = "
            f"ceil(q_len / block_q), k_blocks = ceil(kv_len / block_k)), got {tuple(block_mask.shape)}.")
    return layout


def block_sparse_attention(q, k, v, block_mask, *, block_size=64, mask=None, segment_ids=None, causal=False,
                           sm_scale=None, interpret=None, num_warps=None, num_stages=None):
    """Softmax attention restricted to the tiles of ``block_mask``; [batch, length, heads, head_dim] in and out.

    ``block_size``: int or (block_q, block_k), powers of two (the tile of both the mask and the kernel);
    lengths need not be multiples (padded internally). k, v may have fewer heads dividing q's (GQA).
    Under ``causal`` the tiles wholly in the future are dropped from the mask. A query with no allowed
    key returns the average of the values in its listed tiles (zeros if it lists none); the reference
    averages all keys.
    """
    interpret = interpret_default(interpret)
    flash.check_inputs(NAME, q, k, v, interpret)
    bq, bk = _block_pair(NAME, block_size)
    q_len, heads, kv_len = q.shape[1], q.shape[2], k.shape[1]
    layout = _layout(NAME, block_mask, heads, -(-q_len // bq), -(-kv_len // bk))

    def layout_fn(block_q, block_k):
        # (block_q, block_k) is (bq, bk), or its clamp when a block exceeds the length (one block either way).
        band = flash.band_layout(q_len, kv_len, block_q, block_k, causal, None)
        return layout & band if isinstance(layout, np.ndarray) else layout & jnp.asarray(band)

    blocks = flash.BlockSizes(bq, bk, bq, bk)
    return flash.blocked_attention(NAME, q, k, v, layout_fn, mask=mask, segment_ids=segment_ids, causal=causal,
                                   sm_scale=sm_scale, blocks=blocks, interpret=interpret, num_warps=num_warps,
                                   num_stages=num_stages)


def reference(q, k, v, block_mask, *, block_size=64, mask=None, segment_ids=None, causal=False):
    """The plain-JAX computation ``block_sparse_attention`` accelerates: softmax.attend with the expanded mask."""
    from effjax.attention import softmax

    bq, bk = _block_pair(NAME, block_size)
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    layout = jnp.asarray(block_mask, bool)
    layout = layout[None] if layout.ndim == 2 else layout
    pair = jnp.repeat(jnp.repeat(layout, bq, axis=-2), bk, axis=-1)[:, : q.shape[1], : k.shape[1]]
    return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, pair_mask=pair[None])

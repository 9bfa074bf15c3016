"""Boolean query/key pair patterns shared by the sparse softmax methods (window, block, global, random).

Each builder is a pure function that returns a boolean array whose last two axes are
[q_len, kv_len] (True = the pair may attend). Sparse methods pass it to
``effjax.attention.softmax.attend(..., pair_mask=...)`` after adding the batch/heads axes.
Static patterns are built with ``jnp`` iotas, so under jit XLA computes them rather than
embedding an N x N constant; only BigBird's small block-level random layout is numpy.
"""

import jax.numpy as jnp
import numpy as np


def band(q_len: int, kv_len: int, window: int):
    """[q_len, kv_len]: |i + (kv_len - q_len) - j| <= window (queries aligned to the end, as causal is)."""
    offset = kv_len - q_len
    i = jnp.arange(q_len)[:, None] + offset
    j = jnp.arange(kv_len)[None, :]
    return jnp.abs(i - j) <= window


def block_diagonal(length: int, block: int):
    """[length, length]: i and j lie in the same block of ``block`` consecutive tokens."""
    ids = jnp.arange(length) // block
    return ids[:, None] == ids[None, :]


def global_tokens(is_global):
    """[..., L, L] from a boolean [..., L]: global queries see every key, every query sees global keys."""
    is_global = jnp.asarray(is_global, bool)
    return is_global[..., :, None] | is_global[..., None, :]


def first_tokens(length: int, count: int):
    """Boolean [length], True on the first ``count`` positions (clamped to the length)."""
    return jnp.arange(length) < count


def same_segment(segment_ids):
    """[batch, L, L] from int [batch, L]: same segment id and the key's id is not 0 (0 = padding)."""
    segment_ids = jnp.asarray(segment_ids)
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)


def expand_blocks(layout, block: int):
    """Repeats a block-level layout [..., nq, nk] into a token-level one [..., nq*block, nk*block]."""
    layout = jnp.asarray(layout, bool)
    return jnp.repeat(jnp.repeat(layout, block, axis=-2), block, axis=-1)


def num_blocks(method: str, length: int, block_size: int) -> tuple[int, int]:
    """(block, count) for ``length``; a block_size >= length is clamped to one block of the whole length.

    Raises ValueError naming the method, block_size and length when the length is not a multiple.
    """
    if block_size < 1:
        raise ValueError(f"{method}: block_size must be >= 1, got {block_size}.")
    block = min(block_size, length)
    if length % block:
        raise ValueError(
            f"{method}: sequence length {length} is not divisible by block_size {block_size}; "
            f"pad the length to a multiple of {block_size}."
        )
    return block, length // block


def random_blocks(num_blocks: int, num_random: int, num_heads: int, seed: int) -> np.ndarray:
    """BigBird random layout, numpy bool [num_heads, num_blocks, num_blocks], fixed by ``seed``.

    Every non-global query block (all but the first and last) gets ``num_random`` key blocks drawn
    without replacement, independently per head, from the non-global blocks outside its 3-block
    window; when fewer candidates exist it takes all of them. Global rows/columns stay False here.
    """
    rng = np.random.RandomState(seed)
    layout = np.zeros((num_heads, num_blocks, num_blocks), bool)
    middle = np.arange(1, num_blocks - 1)
    for h in range(num_heads):
        for i in range(1, num_blocks - 1):
            candidates = middle[np.abs(middle - i) > 1]
            chosen = rng.permutation(candidates)[:num_random]
            layout[h, i, chosen] = True
    return layout

"""Block-sparse softmax attention in Pallas: the flash kernel (FlashAttention-2, Dao 2023) visiting only the
key blocks a block mask lists (the block-sparse FlashAttention of Dao et al. 2022, Sec. 3.3).

A boolean ``block_mask`` [heads or 1, q_blocks, k_blocks] (or [q_blocks, k_blocks]) at granularity
``block_size`` says which query-block/key-block tiles are computed, forward and backward; this serves
Longformer/BigBird/MASFormer-style layouts. It is ``softmax.attend`` with
``pair_mask = patterns.expand_blocks(block_mask, block_size)`` (see ``reference``), with the same
``mask``/``segment_ids``/``causal`` token masks inside the listed tiles. The mechanism is the one of
``kernels/flash_attention.py``: per query block a list of key blocks (a range when the rows are
contiguous, a table otherwise), per key block the transposed list for dK/dV. BigBird passes its per-head
numpy layout (``effjax/attention/bigbird.py``).

``window_global_attention`` is Longformer's pattern (Beltagy et al. 2020), exact at token level:
``(|i - j| <= window or global[i] or global[j])`` with causal, key padding and segments, the global
flags [batch, length] tested inside the tiles. Its layout (``window_global_layout``) is the window band's
tiles plus the rows (columns) of tiles holding a global query (key) anywhere in the batch, within the
causal band; numpy when the global flags are concrete, traced otherwise. ``window_global_reference`` is
its plain-JAX twin.
"""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels import flash_attention as flash
from effjax.kernels.backend import interpret_default

NAME = "block_sparse_attention"
WINDOW_GLOBAL = "window_global_attention"


def _block_pair(method: str, block_size) -> tuple[int, int]:
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2:
        raise ValueError(f"{method}: block_size must be an int or a (block_q, block_k) pair, got {block_size}.")
    return pair


def _static_bool(x):
    """``x`` as a numpy bool array when it is concrete, else (traced) as a jax bool array."""
    try:
        return np.asarray(x, bool)
    except jax.errors.TracerArrayConversionError:  # traced: stays a jax array (layouts then visit a table)
        return jnp.asarray(x, bool)


def _layout(method: str, block_mask, heads: int, q_blocks: int, k_blocks: int):
    """The block mask as [1 or heads, q_blocks, k_blocks] bool (numpy when given concretely), checked."""
    layout = _static_bool(block_mask)
    if layout.ndim == 2:
        layout = layout[None]
    if layout.ndim != 3 or layout.shape[1:] != (q_blocks, k_blocks) or layout.shape[0] not in (1, heads):
        raise ValueError(
            f"{method}: block_mask must have shape [1 or {heads}, {q_blocks}, {k_blocks}] (q_blocks = "
            f"ceil(q_len / block_q), k_blocks = ceil(kv_len / block_k)), got {tuple(block_mask.shape)}.")
    return layout


def block_sparse_attention(q, k, v, block_mask, *, block_size=64, mask=None, segment_ids=None, causal=False,
                           sm_scale=None, interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0,
                           dropout_seed=None):
    """Softmax attention restricted to the tiles of ``block_mask``; [batch, length, heads, head_dim] in and out.

    ``block_size``: int or (block_q, block_k), powers of two (the tile of both the mask and the kernel);
    lengths need not be multiples (padded internally). k, v may have fewer heads dividing q's (GQA).
    Under ``causal`` the tiles wholly in the future are dropped from the mask. A query with no allowed
    key returns the average of the values in its listed tiles (zeros if it lists none); the reference
    averages all keys. ``dropout_rate``/``dropout_seed``: attention dropout as in ``flash_attention``.
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
                                   num_stages=num_stages, dropout_rate=dropout_rate, dropout_seed=dropout_seed)


def reference(q, k, v, block_mask, *, block_size=64, mask=None, segment_ids=None, causal=False, dropout_rate=0.0,
              dropout_seed=None):
    """The plain-JAX computation ``block_sparse_attention`` accelerates: softmax.attend with the expanded mask."""
    bq, bk = _block_pair(NAME, block_size)
    layout = jnp.asarray(block_mask, bool)
    layout = layout[None] if layout.ndim == 2 else layout
    pair = jnp.repeat(jnp.repeat(layout, bq, axis=-2), bk, axis=-1)[:, : q.shape[1], : k.shape[1]]
    return flash.reference_attend(q, k, v, pair[None], mask=mask, segment_ids=segment_ids, causal=causal,
                                  dropout_rate=dropout_rate, dropout_seed=dropout_seed)


def method_blocks_attention(method: str, impl, q, k, v, layout, block: int, *, xla, **kwargs):
    """A method's block layout [heads or 1, n, n] at token block ``block`` (``block_local``, ``bigbird``) through
    ``dispatch``: one block covering the length is the "attention" op (any length), otherwise "block_sparse".
    ``xla``: the method's own path (a thunk); ``kwargs``: mask, segment_ids, causal, dropout_rate, dropout_seed.
    """
    from effjax.kernels import dispatch

    if layout.shape[-1] == 1:
        return dispatch.run("attention", impl, dict(q=q, k=k, v=v, **kwargs), xla=xla, where=method)
    call = dict(q=q, k=k, v=v, block_mask=layout, block_size=block, **kwargs)
    return dispatch.run("block_sparse", impl, call, xla=xla, where=method)


def _any_per_block(flags, block: int):
    """[n_blocks] from bool [length]: whether each block of ``block`` tokens holds a True."""
    xp = np if isinstance(flags, np.ndarray) else jnp
    blocks = -(-flags.shape[0] // block)
    return xp.pad(flags, (0, blocks * block - flags.shape[0])).reshape(blocks, block).any(-1)


def window_global_layout(length: int, block_q: int, block_k: int, window: int, global_tokens, causal: bool):
    """Tile layout [1, q_blocks, k_blocks] of Longformer's pattern (numpy when ``global_tokens`` is).

    The window band's tiles, plus every tile in a row of query blocks holding a global query and in a
    column of key blocks holding a global key (over the whole batch), within the causal band.
    """
    band = flash.band_layout(length, length, block_q, block_k, causal, window)
    if global_tokens is None:
        return band
    flags = global_tokens.any(0)
    rows, cols = _any_per_block(flags, block_q), _any_per_block(flags, block_k)
    wide = (rows[:, None] | cols[None, :])[None] & flash.band_layout(length, length, block_q, block_k, causal, None)
    return band | wide


def window_global_attention(q, k, v, *, window: int, global_tokens=None, mask=None, segment_ids=None,
                            causal=False, sm_scale=None, blocks=None, interpret=None, num_warps=None,
                            num_stages=None, dropout_rate=0.0, dropout_seed=None):
    """Longformer attention (Beltagy et al. 2020): keys with ``|i - j| <= window or global[i] or global[j]``.

    Self-attention over [batch, length, heads, head_dim]; ``global_tokens`` bool [batch, length] (None:
    a plain sliding window), ``mask``, ``segment_ids`` and ``causal`` as in ``flash_attention``, all exact
    at token level. Only the tiles of ``window_global_layout`` are computed: O(N * (window + globals))
    when the global tokens are few and gathered in few blocks. Concrete ``global_tokens`` give a static
    layout; traced ones (e.g. a per-batch mask under jit) a traced layout visited through full-width
    tables. ``blocks``: block sizes (default per backend, ``flash.DEFAULT_BLOCKS``). ``dropout_rate``/
    ``dropout_seed``: attention dropout as in ``flash_attention``.
    """
    global_tokens = None if global_tokens is None else _static_bool(global_tokens)  # shape checked by the driver

    def layout_fn(block_q, block_k):
        return window_global_layout(q.shape[1], block_q, block_k, window, global_tokens, causal)

    return flash.blocked_attention(WINDOW_GLOBAL, q, k, v, layout_fn, mask=mask, segment_ids=segment_ids,
                                   causal=causal, window=window, global_tokens=global_tokens, sm_scale=sm_scale,
                                   blocks=blocks, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                                   dropout_rate=dropout_rate, dropout_seed=dropout_seed)


def window_global_reference(q, k, v, *, window: int, global_tokens=None, mask=None, segment_ids=None,
                            causal=False, dropout_rate=0.0, dropout_seed=None):
    """The plain-JAX computation ``window_global_attention`` accelerates: softmax.attend with the pair mask."""
    pair = flash.band(q.shape[1], k.shape[1], window)[None]
    if global_tokens is not None:  # global queries see every key, every query sees global keys
        is_global = jnp.asarray(global_tokens, bool)
        pair = pair | is_global[..., :, None] | is_global[..., None, :]
    return flash.reference_attend(q, k, v, pair[:, None], mask=mask, segment_ids=segment_ids, causal=causal,
                                  dropout_rate=dropout_rate, dropout_seed=dropout_seed)

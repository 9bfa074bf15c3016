"""TransNeXt aggregated attention (Shi, CVPR 2024, Sec. 3.2-3.3 [mem]): 3x3 pixel-focused + pooled keys, one softmax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import grid as grid_lib
from effjax.attention import softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import (
    check_mask,
    check_qkv,
    dropout_kwargs,
    l2_normalize,
    refuse_causal,
    refuse_cross,
    refuse_segments,
)

NAME = "transnext_aggregated"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=True, pallas=False)
TEMPERATURE_INIT = 1 / 0.24  # softplus(temperature) at init, as the reference
CPB_HIDDEN = 512  # width of the continuous-position-bias MLP


def pool_size(hw, sr_ratio: int) -> tuple[int, int]:
    """The pooled grid (h // sr_ratio, w // sr_ratio); ValueError when an axis would be empty."""
    if not isinstance(sr_ratio, int) or sr_ratio < 1:
        raise ValueError(f"{NAME}: sr_ratio must be a positive int, got {sr_ratio!r}.")
    if hw[0] < sr_ratio or hw[1] < sr_ratio:
        raise ValueError(f"{NAME}: grid {hw} is smaller than sr_ratio {sr_ratio}: no pooled token would remain.")
    return hw[0] // sr_ratio, hw[1] // sr_ratio


def _bins(n: int, p: int) -> np.ndarray:
    """Static [p, n] 0/1 membership of PyTorch's adaptive average pooling bins [floor(i n / p), ceil((i+1) n / p))."""
    starts = np.arange(p) * n // p
    ends = -(-(np.arange(p) + 1) * n // p)
    cells = np.arange(n)
    return ((cells[None, :] >= starts[:, None]) & (cells[None, :] < ends[:, None])).astype(np.float32)


def cpb_coordinates(hw, pooled):
    """(table [U, 2], index [h * w, P]): log-spaced query-to-pooled-cell offsets, as the reference's CPB input.

    Offsets are between pixel centres and pooled-bin centres, divided by (size - 1) and scaled by 8, then
    mapped by sign(x) log2(|x| + 1) / log2(8); ``index`` points each (query, pooled cell) pair into the
    table of unique offsets.
    """
    rel = []
    for n, p in zip(hw, pooled, strict=True):
        bins = _bins(n, p)
        centres = bins @ np.arange(n, dtype=np.float32) / bins.sum(1)
        rel.append((np.arange(n)[:, None] - centres[None, :]) / max(n - 1, 1) * 8.0)
    offsets = np.stack(np.broadcast_arrays(rel[0][:, None, :, None], rel[1][None, :, None, :]), axis=-1)
    offsets = offsets.reshape(hw[0] * hw[1] * pooled[0] * pooled[1], 2)
    table, index = np.unique(offsets, axis=0, return_inverse=True)
    table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)
    return table.astype(np.float32), index.reshape(hw[0] * hw[1], pooled[0] * pooled[1])


def pooled_bias(cpb, hw, pooled):
    """[heads, h * w, P] continuous position bias: ``cpb = (w1 [2, hidden], b1, w2 [hidden, heads], b2)``."""
    table, index = cpb_coordinates(hw, pooled)
    w1, b1, w2, b2 = (jnp.asarray(a, jnp.float32) for a in cpb)
    per_offset = jax.nn.relu(jnp.asarray(table) @ w1 + b1) @ w2 + b2  # [U, heads]
    return jnp.moveaxis(per_offset[jnp.asarray(index)], -1, 0)


def neighbours(x, hw, window: int):
    """[batch, h * w, ...] -> [batch, h * w, window**2, ...]: the window x window cells around each cell.

    Row-major over the offsets (as ``nn.Unfold``); cells outside the grid are zeros.
    """
    r = window // 2
    cells = grid_lib.to_grid(x, hw)
    cells = jnp.pad(cells, [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 2))
    shifted = [cells[:, dy:dy + hw[0], dx:dx + hw[1]] for dy in range(window) for dx in range(window)]
    return grid_lib.from_grid(jnp.stack(shifted, axis=3))


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, window=3, sr_ratio=2, grid=None,
           query_embedding=None, temperature=None, local_bias=None, cpb=None, learnable_tokens=None,
           learnable_bias=None, dropout_rate=0.0, dropout_rng=None):
    """Aggregated attention over [batch, length, heads, head_dim] inputs on the ``grid`` of the sequence.

    Each query i attends, in one softmax, to the keys of its ``window`` x ``window`` neighbourhood and to the
    P = (h // sr_ratio) (w // sr_ratio) keys average-pooled over adaptive bins (PyTorch's
    ``AdaptiveAvgPool2d``). Keys are L2-normalized; queries are
    ``(L2norm(q) + query_embedding) * softplus(temperature) * log(n_i + P_real)`` with n_i the real
    neighbours of i. Logits get ``local_bias [heads, window**2]`` and the pooled bias from the ``cpb`` MLP.
    The output is ``sum_local (a_ij + L2norm(q_i) . learnable_tokens[:, j] + learnable_bias_j) v_j +
    sum_pool a_ip v_p``. Parameters left None are neutral: no embedding, softplus(temperature) = 1/0.24,
    zero biases, no dynamic local term. Padded tokens (``mask`` False) are zeroed, left out of the pools and
    masked as keys. Self-attention on one grid only: causal, cross attention and ``segment_ids`` raise
    NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the neighbourhood and the pooled keys include tokens after the query.")
    refuse_cross(NAME, q, k, "neighbourhoods and pools are cells of one grid.")
    refuse_segments(NAME, segment_ids, "pooled keys average neighbouring cells whatever their segment.")
    batch, length, heads, head_dim = q.shape
    dtype = q.dtype
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{NAME}: window must be a positive odd int, got {window!r}.")
    hw = grid_lib.infer(NAME, length, grid)
    pooled = pool_size(hw, sr_ratio)
    local_len, pool_len = window * window, pooled[0] * pooled[1]
    mask = check_mask(NAME, mask, batch, length)
    real = jnp.ones((batch, length), bool) if mask is None else mask
    q, k, v = (jnp.where(real[:, :, None, None], x.astype(jnp.float32), 0.0) for x in (q, k, v))

    # Local keys and values: [b, l, window**2, h, d], zeros outside the grid and at padded tokens.
    k_local, v_local = neighbours(l2_normalize(k) * real[:, :, None, None], hw, window), neighbours(v, hw, window)
    real_local = neighbours(real, hw, window)  # [b, l, window**2]
    # Pooled keys and values: masked means over each adaptive bin.
    membership = jnp.asarray(np.einsum("ph,qw->pqhw", _bins(hw[0], pooled[0]), _bins(hw[1], pooled[1])))
    membership = membership.reshape(pool_len, length)
    counts = jnp.einsum("pl,bl->bp", membership, real.astype(jnp.float32))
    real_pool = counts > 0
    k_pool, v_pool = (jnp.einsum("pl,blhd->bphd", membership, x) / jnp.maximum(counts, 1.0)[:, :, None, None]
                      for x in (k, v))
    k_pool = l2_normalize(k_pool)

    q_norm = l2_normalize(q)
    scale = jax.nn.softplus(temperature.astype(jnp.float32)) if temperature is not None else TEMPERATURE_INIT
    keys_seen = real_local.sum(-1) + real_pool.sum(-1, keepdims=True)  # [b, l]; 0 only for padded queries
    length_scale = jnp.log(jnp.maximum(keys_seen, 1).astype(jnp.float32))
    q_hat = q_norm if query_embedding is None else q_norm + query_embedding.astype(jnp.float32)
    q_hat = q_hat * jnp.reshape(scale, (-1, 1)) * length_scale[:, :, None, None]

    logits_local = jnp.einsum("blhd,bljhd->bhlj", q_hat, k_local)
    if local_bias is not None:
        logits_local = logits_local + local_bias.astype(jnp.float32)[None, :, None, :]
    logits_pool = jnp.einsum("blhd,bphd->bhlp", q_hat, k_pool)
    if cpb is not None:
        logits_pool = logits_pool + pooled_bias(cpb, hw, pooled)[None]
    allowed = jnp.concatenate([real_local[:, None], jnp.broadcast_to(real_pool[:, None, None, :],
                                                                     (batch, 1, length, pool_len))], axis=-1)
    weights = softmax.masked_weights(jnp.concatenate([logits_local, logits_pool], axis=-1), allowed,
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    a_local, a_pool = weights[..., :local_len], weights[..., local_len:]
    if learnable_tokens is not None:
        a_local = a_local + jnp.einsum("blhd,hdj->bhlj", q_norm, learnable_tokens.astype(jnp.float32))
    if learnable_bias is not None:
        a_local = a_local + learnable_bias.astype(jnp.float32)[None, :, None, :]
    out = jnp.einsum("bhlj,bljhd->blhd", a_local, v_local) + jnp.einsum("bhlp,bphd->blhd", a_pool, v_pool)
    return out.astype(dtype)


class Attention(nn.Module):
    """Linen wrapper owning the query embedding, temperature, local bias, CPB MLP and dynamic local tokens.

    ``window`` 3 and ``sr_ratio`` 2 are TransNeXt-Tiny's third stage (15 of its 19 aggregated-attention
    blocks); the pooled length is P = (h // sr_ratio)(w // sr_ratio). Inits follow the reference: query
    embedding and learnable tokens trunc-normal std 0.02, local bias std 4e-4, learnable bias 0, temperature
    with softplus = 1/0.24; the CPB MLP (2 -> 512 -> ReLU -> heads) gets trunc-normal std 0.02 weights and
    zero biases (timm's ViT init). ``grid`` is the (height, width) of the sequence; None takes the square root.
    """

    window: int = 3
    sr_ratio: int = 2
    grid: tuple | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        heads, head_dim = q.shape[2:]
        local_len = self.window * self.window
        tn = nn.initializers.normal  # timm's trunc_normal_(std) cuts at +-2 absolute: never reached at these stds
        temperature_init = math.log(math.expm1(TEMPERATURE_INIT))
        params = dict(
            query_embedding=self.param("query_embedding", tn(0.02), (heads, head_dim), jnp.float32),
            temperature=self.param("temperature", nn.initializers.constant(temperature_init), (heads,), jnp.float32),
            local_bias=self.param("local_bias", tn(4e-4), (heads, local_len), jnp.float32),
            cpb=(self.param("cpb_w1", tn(0.02), (2, CPB_HIDDEN), jnp.float32),
                 self.param("cpb_b1", nn.initializers.zeros, (CPB_HIDDEN,), jnp.float32),
                 self.param("cpb_w2", tn(0.02), (CPB_HIDDEN, heads), jnp.float32),
                 self.param("cpb_b2", nn.initializers.zeros, (heads,), jnp.float32)),
            learnable_tokens=self.param("learnable_tokens", tn(0.02), (heads, head_dim, local_len), jnp.float32),
            learnable_bias=self.param("learnable_bias", nn.initializers.zeros, (heads, local_len), jnp.float32),
        )
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, window=self.window,
                      sr_ratio=self.sr_ratio, grid=self.grid, **params, **dropout_kwargs(self, deterministic))

"""SHViT single-head self-attention (Yun & Ro, CVPR 2024, Sec. 4.1 SHSA [mem]) on a partial channel slice."""

import math

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs, refuse_cross

NAME = "shvit_single_head"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=False, dropout=True, pallas=False,
                            decode=True, extend=True,
                            notes="decoding keeps a key/value cache of max_length slots of the single head only: "
                                  "keys and values max(qk width, attended value width) wide (zero-padded to the "
                                  "wider), not heads x head_dim.")
PARTIAL_RATIO = 1 / 4.67  # the paper's r: the attended share of the channels
# The attended channels the reference configs give each stage width (``model/build.py``: SHViT-S1 widths
# 128/224/320 attend 32/48/68, S2's 128/308/448 attend 32/66/96). Rounding C / 4.67 misses some (320 -> 69).
PAPER_PARTIAL_DIMS = {128: 32, 224: 48, 308: 66, 320: 68, 448: 96}


def slice_widths(channels: int, partial_ratio: float, qk_dim: int) -> tuple[int, int]:
    """(query/key width, attended value width) for ``channels = heads * head_dim``; ValueError if out of range.

    At the paper's ratio a width of a reference stage attends that stage's channel count (PAPER_PARTIAL_DIMS);
    any other width or ratio attends ``round(channels * partial_ratio)``.
    """
    if not 0.0 < partial_ratio <= 1.0:
        raise ValueError(f"{NAME}: partial_ratio must be in (0, 1], got {partial_ratio}.")
    if qk_dim < 1:
        raise ValueError(f"{NAME}: qk_dim must be >= 1, got {qk_dim}.")
    if partial_ratio == PARTIAL_RATIO and channels in PAPER_PARTIAL_DIMS:
        return min(qk_dim, channels), PAPER_PARTIAL_DIMS[channels]
    return min(qk_dim, channels), max(1, round(channels * partial_ratio))


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, partial_ratio=PARTIAL_RATIO, qk_dim=16,
           dropout_rate=0.0, dropout_rng=None):
    """One softmax head on the first channels of the heads concatenated; the other value channels pass through.

    With ``C = heads * head_dim`` channels (head-major), the first ``p`` (``slice_widths``: the reference's
    per-stage count at the paper's ratio, else ``round(C * partial_ratio)``) value
    channels become ``softmax(q_s k_s^T / sqrt(d_qk)) v[:p]``, where ``q_s, k_s`` are the first
    ``d_qk = min(qk_dim, C)`` query/key channels; value channels ``p..C`` are returned unchanged.
    There is no spatial op, so any length works and ``mask``, ``segment_ids`` and ``causal`` are those of
    ``softmax.attend``. Self-attention only (the passthrough channels are the values at the query positions).
    """
    check_qkv(NAME, q, k, v)
    refuse_cross(NAME, q, k, "the untouched channels are the values of the query's own position.")
    single = single_head(q, k, v, partial_ratio, qk_dim)
    attended = softmax.attend(*single, mask=mask, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng)
    return merge(attended, v, partial_ratio, qk_dim).astype(q.dtype)


def single_head(q, k, v, partial_ratio, qk_dim):
    """The single head's query, key and value ``[batch, length, 1, width]`` (float32) that ``softmax.attend``
    takes: the sliced channels, zero-padded to ``width = max(d_qk, p)`` (padding adds nothing to q.k), q rescaled
    so that softmax's 1/sqrt(width) becomes the head's 1/sqrt(d_qk)."""
    batch, length, heads, head_dim = q.shape
    width_qk, width_v = slice_widths(heads * head_dim, partial_ratio, qk_dim)
    width = max(width_qk, width_v)

    def head(x, used, scale=1.0):
        x = x.reshape(batch, length, 1, heads * head_dim)[..., :used].astype(jnp.float32) * scale
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - used)])

    return head(q, width_qk, math.sqrt(width / width_qk)), head(k, width_qk), head(v, width_v)


def merge(attended, v, partial_ratio, qk_dim):
    """The output ``[batch, length, heads, head_dim]``: the head's first ``p`` channels, then v's channels p..C."""
    batch, length, heads, head_dim = v.shape
    _, width_v = slice_widths(heads * head_dim, partial_ratio, qk_dim)
    flat = v.reshape(batch, length, heads * head_dim)
    out = jnp.concatenate([attended[:, :, 0, :width_v].astype(v.dtype), flat[..., width_v:]], axis=-1)
    return out.reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters of its own.

    Defaults: the paper's partial ratio r = 1/4.67 (the reference's exact per-stage counts at its stage widths)
    and qk_dim 16 (``model/build.py`` configs). The reference's
    GroupNorm pre-norm on the slice and its per-slice q/k/v projection are the encoder's q/k/v projections here;
    the ReLU before the output projection is not applied (the encoder's output projection is linear).
    """

    partial_ratio: float = PARTIAL_RATIO
    qk_dim: int = 16
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The single head's key/value cache (``effjax.attention.decoding``): ``max_length`` slots of keys and
        values ``max(d_qk, p)`` wide (``single_head``); the passthrough channels need no cache."""
        width_qk, width_v = slice_widths(heads * head_dim, self.partial_ratio, self.qk_dim)
        return decoding.kv_init(batch, max_length, 1, max(width_qk, width_v), dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        call = dict(partial_ratio=self.partial_ratio, qk_dim=self.qk_dim)
        if cache is None:
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                          **call, **dropout_kwargs(self, deterministic))
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        refuse_cross(NAME, q, k, "the untouched channels are the values of the query's own position.")
        single = single_head(q, k, v, **call)
        attended, cache = decoding.kv_decode(
            NAME, *single, cache, positions, mask,
            forward=lambda: softmax.attend(*single, mask=mask, causal=True, **dropout_kwargs(self, deterministic)))
        return merge(attended, v, **call).astype(q.dtype), cache

"""Longformer sliding-window + global attention (Beltagy et al. 2020, "Longformer", Sec. 3.1, Fig. 2d)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import patterns, softmax
from effjax.attention.common import check_qkv, dropout_kwargs

NAME = "longformer"


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, window=256, num_global=1, global_mask=None,
           dropout_rate=0.0, dropout_rng=None):
    """Softmax over keys with ``|i - j| <= window OR global[i] OR global[j]`` (symmetric global attention).

    The global set is the first ``num_global`` positions (a CLS token; clamped to the length) united
    with the optional boolean ``global_mask`` [batch, length] (e.g. question tokens). Global rows reuse
    q, k, v: the paper's separate global projections are not modelled. ``causal`` intersects the
    pattern with the causal mask (keys [i - window, i] plus earlier global tokens; a global query sees
    only its prefix). Self-attention only. Masked O(N^2) softmax: exact, not faster than ``softmax``.
    """
    check_qkv(NAME, q, k, v)
    batch, length = q.shape[:2]
    if k.shape[1] != length:
        raise NotImplementedError(
            f"{NAME}: cross attention (q_len {length} != kv_len {k.shape[1]}) is not supported: "
            "the window and global tokens are positions of one sequence."
        )
    if window < 0 or num_global < 0:
        raise ValueError(f"{NAME}: window and num_global must be >= 0, got {window} and {num_global}.")
    is_global = patterns.first_tokens(length, num_global)[None]
    if global_mask is not None:
        global_mask = jnp.asarray(global_mask, bool)
        if global_mask.shape != (batch, length):
            raise ValueError(
                f"{NAME}: global_mask must have shape [batch, length] = {(batch, length)}, got {global_mask.shape}."
            )
        is_global = is_global | global_mask
    pair = patterns.band(length, length, window)[None] | patterns.global_tokens(is_global)
    return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                          pair_mask=pair[:, None], dropout_rate=dropout_rate, dropout_rng=dropout_rng)


class Attention(nn.Module):
    """Linen wrapper of ``attend``: one-sided ``window`` 256 (longformer-base-4096), one global CLS token."""

    window: int = 256
    num_global: int = 1
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, window=self.window,
                      num_global=self.num_global, **dropout_kwargs(self, deterministic))

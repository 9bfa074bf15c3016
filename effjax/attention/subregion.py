"""E-MMDiT alternating subregion attention, ASA (AMD Nitro-E, arXiv:2510.27135, the (l s n) -> s (l n) regroup)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import permute
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs, refuse_causal, refuse_cross

NAME = "subregion"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=True)


def subregion_order(length: int, ratio: int, chunk: int):
    """[length] permutation ``(l s n) -> (s l n)``: chunks of ``chunk`` tokens dealt round-robin into ``ratio``
    subregions, each subregion's tokens kept in sequence order; subregion r is the r-th run of length / ratio."""
    return jnp.arange(length).reshape(length // (ratio * chunk), ratio, chunk).transpose(1, 0, 2).reshape(-1)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, ratio=4, chunk=1, dropout_rate=0.0,
           dropout_rng=None, impl="xla"):
    """Softmax within each of ``ratio`` subregions: token t belongs to subregion (t // chunk) % ratio.

    ``ratio=1`` is full softmax. Padded keys are excluded inside every subregion; ``segment_ids`` restrict
    each subregion further. Self-attention only; ValueError unless length % (ratio * chunk) == 0.
    ``impl="pallas"``: the flash kernel on each subregion (``permute.attend_in_groups``); dropout with the kernel's
    own draws, head_dim a power of two.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "a subregion mixes tokens from the whole sequence (t with t +- ratio * chunk).")
    refuse_cross(NAME, q, k, "subregions partition one sequence.")
    length = q.shape[1]
    for label, value in (("ratio", ratio), ("chunk", chunk)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{NAME}: {label} must be a positive int, got {value!r}.")
    if length % (ratio * chunk):
        raise ValueError(f"{NAME}: sequence length {length} is not divisible by ratio * chunk = {ratio * chunk}.")
    return permute.attend_in_groups(q, k, v, group_size=length // ratio, method=NAME,
                                    order=subregion_order(length, ratio, chunk), mask=mask, segment_ids=segment_ids,
                                    dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl)


class Attention(nn.Module):
    """Linen wrapper of ``attend``.

    E-MMDiT cycles its layers through (ratio, chunk) = (1, 1), (4, 1), (4, 4); that alternation is a model-level
    schedule (set these fields per layer). The default (4, 1) is the cycle's first subregion layer.
    """

    ratio: int = 4
    chunk: int = 1
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the flash kernel on each subregion

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, ratio=self.ratio, chunk=self.chunk,
                      impl=self.impl, **dropout_kwargs(self, deterministic))

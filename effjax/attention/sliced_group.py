"""SReT sliced group self-attention (Shen et al., ECCV 2022, "Sliced Recursive Transformer", Sec. 3.3)."""

import jax
from flax import linen as nn

from effjax.attention import permute
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs, refuse_causal, refuse_cross

NAME = "sliced_group"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=True)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, groups=8, order=None, dropout_rate=0.0,
           dropout_rng=None, impl="xla"):
    """Softmax within ``groups`` contiguous slices of length / groups tokens of the sequence taken in ``order``.

    ``order`` ([length] or [batch, length]; None = identity) is the token permutation SReT applies on a
    block's recursive pass; it is undone on the output. Padded keys are excluded inside every group and
    ``segment_ids`` restrict each group further. Self-attention only; ValueError when the length is not a
    multiple of ``groups``. ``impl="pallas"``: the flash kernel on each slice (``permute.attend_in_groups``);
    dropout with the kernel's own draws, head_dim a power of two.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "groups (and SReT's permutation) ignore token order.")
    refuse_cross(NAME, q, k, "groups slice one sequence.")
    length = q.shape[1]
    if not isinstance(groups, int) or groups < 1 or groups > length:
        raise ValueError(f"{NAME}: groups must be an int in [1, length={length}], got {groups!r}.")
    if length % groups:
        raise ValueError(f"{NAME}: sequence length {length} is not divisible by groups {groups}.")
    return permute.attend_in_groups(q, k, v, group_size=length // groups, method=NAME, order=order, mask=mask,
                                    segment_ids=segment_ids, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                    impl=impl)


def permutation(rng, length: int):
    """A uniformly random permutation of range(length) (SReT's ``randperm(N)``), shared by the batch."""
    return jax.random.permutation(rng, length)


class Attention(nn.Module):
    """Linen wrapper of ``attend``.

    ``groups=8`` is SReT-T's first-stage ``groups1``. ``shuffle=True`` is SReT's recursive pass (its first
    stage uses ``groups2=2`` there): a fresh permutation from the ``random`` RNG stream on every call with
    ``deterministic=False``, and with ``deterministic=True`` the fixed permutation drawn from
    ``jax.random.key(eval_seed)`` (the reference redraws at eval too, so its inference is stochastic).
    """

    groups: int = 8
    shuffle: bool = False
    eval_seed: int = 0
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the flash kernel on each group

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        order = None
        if self.shuffle:
            rng = jax.random.key(self.eval_seed) if deterministic else self.make_rng("random")
            order = permutation(rng, q.shape[1])
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, groups=self.groups, order=order,
                      impl=self.impl, **dropout_kwargs(self, deterministic))

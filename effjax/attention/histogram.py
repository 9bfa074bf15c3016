"""Histoformer dynamic-range histogram self-attention core (Sun et al., ECCV 2024, Sec. 3.1 DHSA: BHR x FHR)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import permute
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, l2_normalize, refuse_causal, refuse_cross, refuse_segments

NAME = "histogram"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=False, pallas=False)
BRANCHES = ("both", "bin", "frequency")
NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps, as in the reference


def to_bins(x, num_bins: int, interleaved: bool):
    """Sorted values ``[b, L', h, d]`` -> ``[b, h, d * num_bins, L' / num_bins]``: tokens are (channel, bin) pairs.

    Bin-wise (BHR, ``interleaved=False``): bin f holds the contiguous sorted run f * n .. (f + 1) * n - 1;
    frequency-wise (FHR, ``interleaved=True``): bin f holds sorted positions f, f + num_bins, f + 2 num_bins, ...
    """
    b, length, h, d = x.shape
    n = length // num_bins
    x = x.reshape((b, n, num_bins, h, d) if interleaved else (b, num_bins, n, h, d))
    x = x.transpose((0, 3, 4, 2, 1) if interleaved else (0, 3, 4, 1, 2))  # [b, h, d, bin, n]
    return x.reshape(b, h, d * num_bins, n)


def from_bins(x, d: int, num_bins: int, interleaved: bool):
    """Inverse of ``to_bins``: ``[b, h, d * num_bins, n]`` -> ``[b, n * num_bins, h, d]``."""
    b, h, _, n = x.shape
    x = x.reshape(b, h, d, num_bins, n)
    x = x.transpose((0, 4, 3, 1, 2) if interleaved else (0, 3, 4, 1, 2))
    return x.reshape(b, n * num_bins, h, d)


def binned_attention(q, k, v, real, *, num_bins: int, interleaved: bool, temperature):
    """One branch on sorted, padding-zeroed ``[b, L', h, d]`` inputs: cosine logits times ``temperature``,
    softmax_1 (exp / (sum exp + 1), no max subtraction, as in the reference) over the (channel, bin) tokens
    that hold at least one real pixel. Returns ``[b, L', h, d]``."""
    d = q.shape[-1]
    qb, kb, vb = (to_bins(x, num_bins, interleaved) for x in (q, k, v))
    qb, kb = l2_normalize(qb, eps=NORM_EPS), l2_normalize(kb, eps=NORM_EPS)
    key_real = jnp.any(to_bins(real, num_bins, interleaved), axis=-1)  # [b, h, d * bins]
    logits = jnp.einsum("bhin,bhjn->bhij", qb, kb) * jnp.reshape(temperature, (-1, 1, 1))
    weights = jnp.where(key_real[:, :, None, :], jnp.exp(logits), 0.0)
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1.0)
    return from_bins(jnp.einsum("bhij,bhjn->bhin", weights, vb), d, num_bins, interleaved)


def value_order(v, mask=None):
    """[b, L, h, d] argsort of v along the length per (batch, head, channel); padded tokens sort last."""
    key = v.astype(jnp.float32)
    if mask is not None:
        key = jnp.where(jnp.asarray(mask, bool)[:, :, None, None], key, jnp.inf)
    return jnp.argsort(key, axis=1, stable=True)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, num_bins=None, temperature=1.0, branches="both"):
    """DHSA core with head_dim as channels and the length as pixels.

    Per (batch, head, channel), the length is sorted by v's value (the same order gathers q and k), padded
    with zeros to a multiple of ``num_bins`` (None: the number of heads, as Histoformer's factor) and cut into
    bins; the (channel, bin) pairs attend to each other with the bin's pixels as features. ``branches``:
    "bin" (BHR, contiguous bins), "frequency" (FHR, interleaved bins) or "both" (their product, the paper's
    output). The result is un-sorted by gathering with the inverse order. ``temperature`` is a scalar or
    per-head [heads]. Padded tokens sort after every real one and are zeroed, so they act as the reference's
    zero padding and never change real outputs. No causal, cross attention or segments (the sort is global).
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the value sort mixes the whole sequence.")
    refuse_cross(NAME, q, k, "q, k and v share one sort along the length.")
    refuse_segments(NAME, segment_ids, "the value sort and the bins mix the whole sequence.")
    if branches not in BRANCHES:
        raise ValueError(f"{NAME}: branches must be one of {BRANCHES}, got {branches!r}.")
    dtype, (_, length, heads, _) = q.dtype, q.shape
    num_bins = heads if num_bins is None else num_bins
    if not isinstance(num_bins, int) or num_bins < 1 or num_bins > length:
        raise ValueError(f"{NAME}: num_bins must be an int in [1, length={length}], got {num_bins!r}.")
    order = value_order(v, mask)
    real = jnp.ones(q.shape, bool) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, bool)[:, :, None, None], q.shape)
    real = permute.gather(real, order)
    q, k, v = (jnp.where(real, permute.gather(x.astype(jnp.float32), order), 0.0) for x in (q, k, v))
    extra = -length % num_bins
    if extra:
        q, k, v, real = (jnp.pad(x, [(0, 0), (0, extra), (0, 0), (0, 0)]) for x in (q, k, v, real))
    temperature = jnp.asarray(temperature, jnp.float32)
    out = None
    for interleaved in {"bin": (False,), "frequency": (True,), "both": (False, True)}[branches]:
        branch = binned_attention(q, k, v, real, num_bins=num_bins, interleaved=interleaved, temperature=temperature)
        out = branch if out is None else out * branch
    return permute.gather(out[:, :length], permute.inverse(order)).astype(dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the learnable per-head ``temperature`` (init 1, as in the reference).

    ``dropout_rate`` is accepted for the common interface; the reference has no attention dropout here.
    """

    num_bins: int | None = None
    branches: str = "both"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        temperature = self.param("temperature", nn.initializers.ones, (q.shape[2],), jnp.float32)
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, num_bins=self.num_bins,
                      temperature=temperature, branches=self.branches).astype(q.dtype)

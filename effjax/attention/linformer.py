"""Linformer (Wang et al. 2020, "Self-Attention with Linear Complexity", Eq. 7): softmax(Q (E K)^T/sqrt(d)) F V."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout, dropout_kwargs

NAME = "linformer"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=True, dropout=True, pallas=False)


def _refuse(segment_ids, causal):
    if causal:
        raise NotImplementedError(
            f"{NAME}: causal=True is not supported: the length projections E and F mix every key "
            "position, so each output would read future tokens.")
    if segment_ids is not None:
        raise NotImplementedError(
            f"{NAME}: segment_ids are not supported: the length projections E and F mix keys of all "
            "segments into every projected key.")


def _project(x, proj, mask):
    """[batch, n, heads, d] -> [batch, k, heads, d]: sum_n proj[n, j] x[n], padded rows zeroed first."""
    x = x.astype(jnp.float32)
    if mask is not None:
        x = jnp.where(mask[:, :, None, None], x, 0.0)
    return jnp.einsum("bnhd,nk->bkhd", x, proj[: x.shape[1]].astype(jnp.float32))


def attend(q, k, v, e_proj, f_proj=None, *, mask=None, segment_ids=None, causal=False, dropout_rate=0.0,
           dropout_rng=None):
    """Linformer attention over [batch, length, heads, head_dim] inputs, computed in float32.

    ``e_proj`` and ``f_proj`` are the length projections E and F of shape [n, k] with n >= kv_len
    (only their first kv_len rows are used, as in fairseq); ``f_proj=None`` shares E for values.
    Keys and values at padded positions (``mask`` False) are zeroed before projecting, so they
    cannot change any output; the projected keys are all unmasked, as in the paper. With k = kv_len,
    E = F = identity and no padding this is exactly softmax attention.
    """
    check_qkv(NAME, q, k, v)
    _refuse(segment_ids, causal)
    batch, _, _, head_dim = q.shape
    kv_len = k.shape[1]
    f_proj = e_proj if f_proj is None else f_proj
    for label, proj in (("e_proj", e_proj), ("f_proj", f_proj)):
        if proj.ndim != 2 or proj.shape[0] < kv_len:
            raise ValueError(f"{NAME}: {label} must have shape [n >= kv_len = {kv_len}, k], got {proj.shape}.")
    if e_proj.shape[1] != f_proj.shape[1]:
        raise ValueError(f"{NAME}: e_proj {e_proj.shape} and f_proj {f_proj.shape} project to different k.")
    mask = check_mask(NAME, mask, batch, kv_len)
    k_proj = _project(k, e_proj, mask)
    v_proj = _project(v, f_proj, mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k_proj) / jnp.sqrt(jnp.float32(head_dim))
    weights = jax.nn.softmax(logits, axis=-1)
    weights = dropout(weights, dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v_proj).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning E (and F unless ``share_kv``) of shape [kv_len, k], sized at init.

    ``k`` is the projected length (fairseq default 256); ``share_kv`` uses E for values too.
    E and F are initialised xavier-uniform with gain 1/sqrt(2) as in fairseq. Applying the module to
    a different kv_len than it was initialised with fails in flax's parameter shape check.
    """

    k: int = 256
    share_kv: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        _refuse(segment_ids, causal)
        if self.k < 1:
            raise ValueError(f"{NAME}: projected length k must be positive, got {self.k}.")
        init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")  # xavier_uniform, gain 1/sqrt(2)
        shape = (k.shape[1], self.k)
        e_proj = self.param("e_proj", init, shape, jnp.float32)
        f_proj = None if self.share_kv else self.param("f_proj", init, shape, jnp.float32)
        return attend(q, k, v, e_proj, f_proj, mask=mask, **dropout_kwargs(self, deterministic))

"""HGRN2 (Qin, Yang, Sun, Shen, Li, Sun, Zhong, "HGRN2: Gated Linear RNNs with State Expansion", COLM 2024,
arXiv 2404.07904; catalog ``linear_families.md`` Sec. 3.7) on the ``gated_linear`` core.

The block's q, k, v are HGRN2's output gate, forget-gate logits f and input i. Per head, with a per-channel
forget gate bounded below by gamma:

    lambda_t = gamma + (1 - gamma) sigmoid(f_t)     (in log space: logaddexp(log gamma, log(1-gamma) + logsigmoid f))
    S_t = Diag(lambda_t) S_{t-1} + (1 - lambda_t) i_t^T,     o_t = S_t^T swish(q_t) / sqrt(d_k)
    y = RMSNorm(concat_h o)          (over the whole hidden: all heads together, affine, eps 1e-5)

that is GLA with key ``1 - lambda = (1 - gamma) sigmoid(-f)`` (computed in that form, without cancellation),
value ``i`` and log-decay ``log lambda``, as fla's ``layers/hgrn2.py`` (which calls ``chunk_gla`` with scale
``d_k^-1/2``). No short conv (fla's default).

``causal=False`` is the official bidirectional module (hgru2-pytorch ``BiHgru2_1d``, used for LRA and ImageNet):
the forward scan plus the reversed scan (``recurrent.both_directions``), summed before the norm.

Departures: the lower bound gamma of the official model is a cross-layer table (``cumsum(softmax over layers)``
minus its first row: 0 at layer 0, growing with depth), which a single layer cannot hold; here it is a learnable
bound per channel of this module, ``gamma = sigmoid(theta)`` with ``theta`` initialised so that gamma starts at
``lower_bound_init`` (0.01: small, as the low layers' bounds; None: no bound, as the official layer 0). The key
dim is the block's D (fla: ``expand_ratio`` 128). ``dropout_rate`` is accepted for the common interface and unused.
``attend`` takes an ``initial_state [batch, heads, d, d]`` and returns ``(out, state)`` with ``return_state``;
decoding (``init_cache``, ``cache``/``positions``; ``recurrent.decode``) keeps that state alone (no short conv).

``impl="pallas"``: the chunked linear-attention kernel with per-channel decays (``kernels/linear_attention.py``,
through ``kernels.dispatch`` op "linear") runs the chunked form, both scans of ``causal=False`` included; the
parallel and recurrent forms stay XLA.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import gated_linear as core
from effjax.attention import recurrent
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv
from effjax.kernels.backend import check_impl

NAME = "hgrn2"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True,
    decode=True, extend=True,
    notes="causal=False is the official BiHGRN2 (forward plus reversed scan); forms: chunked (default), parallel, "
          "recurrent; initial_state / return_state carry the state; impl='pallas' (the chunked linear-attention "
          "kernel with per-channel decays) runs the chunked form only; decoding keeps the state (d x d per head).")
DEFAULT_CHUNK_SIZE = 64  # fla's chunk_gla
NORM_EPS = 1e-5  # fla's norm_eps


def forget_gate(f, lower_bound_logit=None):
    """``(log lambda, 1 - lambda)`` of the forget logits ``f`` and the bound ``gamma = sigmoid(lower_bound_logit)``
    (None: gamma = 0), float32, ``log lambda <= 0``."""
    f = f.astype(jnp.float32)
    if lower_bound_logit is None:
        return jax.nn.log_sigmoid(f), jax.nn.sigmoid(-f)
    theta = lower_bound_logit.astype(jnp.float32)
    log_gamma, log_rest = jax.nn.log_sigmoid(theta), jax.nn.log_sigmoid(-theta)  # log gamma, log(1 - gamma)
    log_lambda = jnp.logaddexp(log_gamma, log_rest + jax.nn.log_sigmoid(f))
    return jnp.minimum(log_lambda, 0.0), jnp.exp(log_rest + jax.nn.log_sigmoid(-f))  # min: rounding above 1


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, impl="xla"):
    """HGRN2 of ``q, k, v [batch, length, heads, d]`` (output gate, forget logits, input) with ``params``:
    ``norm [heads d]`` and optionally ``lower_bound [heads, d]`` (the logit of gamma). Returns ``[batch, length,
    heads, d]`` in q's dtype (and the float32 state with ``return_state``); padded positions give 0. ``impl``:
    "xla" or a kernel backend for the chunked form (``gated_linear``)."""
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    recurrent.check_self(NAME, q, k)
    recurrent.check_carry(NAME, causal, initial_state, return_state)
    batch, length, heads, dim = q.shape
    keep = recurrent.keep_mask(NAME, mask, batch, length)
    log_lambda, key = forget_gate(k, params.get("lower_bound"))
    query = jax.nn.silu(q.astype(jnp.float32)) * dim ** -0.5
    o, state = core.forward_or_both(NAME, query, key, v, log_lambda, causal=causal, form=form, chunk_size=chunk_size,
                                    initial_state=initial_state, segment_ids=segment_ids, keep=keep, impl=impl)
    out = recurrent.rms_norm(o.reshape(batch, length, heads * dim), params["norm"], NORM_EPS).reshape(o.shape)
    out = core.zero_pads(out, keep).astype(q.dtype)
    return (out, state) if return_state else out


class Attention(nn.Module):
    """Linen wrapper owning the per-channel lower bound (see the module docstring) and the norm weight."""

    lower_bound_init: float | None = 0.01
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0  # accepted, unused
    impl: str = "xla"  # "pallas": the chunked linear-attention kernel with per-channel decays (chunked form)

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The state ``[batch, heads, d, d]`` float32 (``recurrent.init_cache``; ``max_length`` unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        recurrent.check_self(NAME, q, k)
        heads, dim = q.shape[2:]
        params = {"norm": self.param("norm", nn.initializers.ones, (heads * dim,), jnp.float32)}
        if self.lower_bound_init is not None:
            if not 0.0 < self.lower_bound_init < 1.0:
                raise ValueError(f"{NAME}: lower_bound_init must be in (0, 1) or None, got {self.lower_bound_init}.")
            logit = math.log(self.lower_bound_init) - math.log1p(-self.lower_bound_init)
            params["lower_bound"] = self.param("lower_bound", nn.initializers.constant(logit), (heads, dim),
                                               jnp.float32)
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, form=self.form, chunk_size=self.chunk_size,
                    impl=self.impl)
        if cache is None:
            return attend(q, k, v, params, **call)
        return recurrent.decode(NAME, attend, q, k, v, params, cache, positions=positions, **call)

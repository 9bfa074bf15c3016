"""Gated DeltaNet: the delta rule with a Mamba2-style scalar decay (Yang, Kautz, Hatamizadeh, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", ICLR 2025, arXiv 2412.06464), as fla's ``fla/layers/gated_deltanet.py`` builds it
(catalog ``linear_families.md`` Sec. 3.4).

Per head, on the block's projected q, k, v:
    q, k, v <- SiLU(short causal depthwise conv_4(q, k, v))     (no conv bias, as fla's default)
    q <- L2norm(q) / sqrt(d_k),  k <- L2norm(k)                  (fla's l2norm: x / sqrt(|x|^2 + 1e-6))
    beta_t = sigmoid(u_t W_beta)  (x 2 with ``allow_neg_eigval``)
    g_t = -exp(A_log) softplus(u_t W_a + dt_bias)                (log a_t <= 0, per head)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t      (``delta_rule``)
    y_t = RMSNorm_head(o_t) (affine, eps 1e-5) x SiLU(v_flat_t W_gate)   [RMSNorm alone with ``use_gate=False``]
Init as fla's layer: A = U(0, 16) per head (A_log = log A, sampled from U(1e-6, 16) so that log 0 cannot occur),
dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] floored at 1e-4; projections with PyTorch's default
Linear init (the layer's own init).

Departures from the paper's layer, all forced by the q/k/v interface (catalog Sec. 2.7):
  * beta and the decay's logits come from u_t = concat_heads(q_t, k_t, v_t) (the raw, pre-conv inputs, 3 H D
    features) instead of the hidden state x_t, the output gate from concat_heads(v_t) (H D features) instead of x_t;
  * the head dims are the block's: d_v = d_k = D (fla's default expand_v is 2), and no grouped value heads;
  * ``causal=False`` is refused unless ``bidirectional="sum"``: the causal layer plus the same layer run right to
    left (catalog Sec. 2.9; the diagonal token is counted in both directions), no state passed in or out;
  * ``dropout_rate`` is accepted (models pass one rate to every layer) and unused: the paper has no dropout here.
Padded tokens (``mask`` False) are zeroed before the conv and leave the state unchanged (g = 0 there); their outputs
are 0. ``segment_ids`` restart the state and cut the conv at every run start (``recurrent.run_starts``).
Decoding is DeltaNet's module's (``deltanet``): the cache holds the state and the short convs' last raw inputs.
"""

import math

import jax
import jax.numpy as jnp

from effjax.attention import deltanet
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import torch_uniform
from effjax.attention.delta_rule import DEFAULT_CHUNK_SIZE
from effjax.attention.deltanet import NORM_EPS, delta_method

NAME = "gated_deltanet"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True, decode=True, extend=True,
    notes="A causal recurrence: causal=False is refused unless bidirectional='sum' (forward plus reversed scan). "
          "form: 'chunked' (WY/UT, default), 'parallel' (quadratic reference) or 'recurrent' (token scan); "
          "impl='pallas' runs the chunked form on the chunked delta-rule kernel; decoding keeps the state (d x d per "
          "head) and the short convs' last conv_size - 1 raw q, k, v inputs (DeltaNet's module's).")
A_RANGE = (1e-6, 16.0)  # fla: U(0, 16); the lower end moved off 0 so that log A is finite
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4


def log_decay(u, params):
    """``g = -exp(A_log) softplus(u W_a + dt_bias)`` per head, ``[batch, length, heads]``, from the features u."""
    return -jnp.exp(params["a_log"]) * jax.nn.softplus(u @ params["decay"] + params["dt_bias"])


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, allow_neg_eigval=False,
           bidirectional=None, norm_eps=NORM_EPS, impl="xla"):
    """The Gated DeltaNet mixer on ``q, k, v [batch, length, heads, head_dim]``; returns ``[batch, length, heads,
    head_dim]`` in q's dtype, and the final state ``[batch, heads, head_dim, head_dim]`` (float32) too when
    ``return_state``.

    ``params``: as ``deltanet.attend`` (``beta``, ``norm``, optional ``conv_q/k/v`` and ``gate``) plus ``decay
    [3 heads head_dim, heads]``, ``a_log [heads]`` and ``dt_bias [heads]``. ``initial_state`` and ``return_state``
    need ``causal=True``. ``impl``: "xla", or a kernel backend for the chunked form (``delta_rule.delta_rule``).
    """
    return delta_method(NAME, q, k, v, params, log_decay=log_decay, mask=mask, segment_ids=segment_ids,
                        causal=causal, form=form, chunk_size=chunk_size, initial_state=initial_state,
                        return_state=return_state, allow_neg_eigval=allow_neg_eigval, bidirectional=bidirectional,
                        norm_eps=norm_eps, impl=impl)


def a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, *A_RANGE))


def dt_bias_init(key, shape, dtype=jnp.float32):
    """softplus^-1(dt), dt log-uniform in [DT_MIN, DT_MAX] and floored at DT_FLOOR (Mamba2's dt init)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(DT_MIN), math.log(DT_MAX)))
    dt = jnp.maximum(dt, DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


class Attention(deltanet.Attention):
    """The Gated DeltaNet mixer with fla's defaults: DeltaNet's module with the output gate on and the decay
    (see the module docstring for the departures)."""

    use_gate: bool = True

    method_name = NAME
    log_decay = staticmethod(log_decay)

    def decay_params(self, heads: int, head_dim: int) -> dict:
        features = 3 * heads * head_dim
        return {"decay": self.param("decay", torch_uniform(features), (features, heads), jnp.float32),
                "a_log": self.param("a_log", a_log_init, (heads,), jnp.float32),
                "dt_bias": self.param("dt_bias", dt_bias_init, (heads,), jnp.float32)}

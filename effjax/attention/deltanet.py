"""DeltaNet: linear attention with the delta rule (Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length", NeurIPS 2024, arXiv 2406.06484; the rule from Schlag, Irie, Schmidhuber,
"Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021), as fla's ``fla/layers/delta_net.py`` builds
it (catalog ``linear_families.md`` Sec. 3.3).

Per head, on the block's projected q, k, v:
    q, k, v <- SiLU(short causal depthwise conv_4(q, k, v))     (no conv bias, as fla's default)
    q <- L2norm(q) / sqrt(d_k),  k <- L2norm(k)                  (fla's l2norm: x / sqrt(|x|^2 + 1e-6))
    beta_t = sigmoid(u_t W_beta)  (x 2 with ``allow_neg_eigval``: beta in (0, 2), arXiv 2411.12537)
    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t      (``delta_rule``)
    y_t = RMSNorm_head(o_t) (affine, eps 1e-5)  [x SiLU(v_flat_t W_gate) with ``use_gate``, off by default]

Departures from the paper's layer, all forced by the q/k/v interface (catalog Sec. 2.7):
  * beta comes from u_t = concat_heads(q_t, k_t, v_t) (the raw, pre-conv inputs, 3 H D features) instead of the
    hidden state x_t, and the optional output gate from concat_heads(v_t) (H D features) instead of x_t; both are
    dense maps without bias with PyTorch's default Linear init (the fla layer's own init);
  * the head dims are the block's: d_v = d_k = D (fla's defaults expand_k = expand_v = 1 agree);
  * ``causal=False`` is refused unless ``bidirectional="sum"``: the causal layer plus the same layer run right to
    left (catalog Sec. 2.9; the diagonal token is counted in both directions), no state passed in or out;
  * ``dropout_rate`` is accepted (models pass one rate to every layer) and unused: the paper has no dropout here.
Padded tokens (``mask`` False) are zeroed before the conv and leave the state unchanged; their outputs are 0.
``segment_ids`` restart the state and cut the conv at every run start (``recurrent.run_starts``).

Decoding (``init_cache``, ``cache``/``positions``; ``recurrent.decode``): the cache holds the state and the raw
(pre-conv) q, k, v of the last ``conv_size - 1`` tokens, which a step's short convs read (``history``).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import fftconv, recurrent
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, torch_uniform
from effjax.attention.delta_rule import DEFAULT_CHUNK_SIZE, delta_rule, qk_l2_norm
from effjax.kernels.backend import check_impl

NAME = "deltanet"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True, decode=True, extend=True,
    notes="A causal recurrence: causal=False is refused unless bidirectional='sum' (forward plus reversed scan). "
          "form: 'chunked' (WY/UT, default), 'parallel' (quadratic reference) or 'recurrent' (token scan); "
          "impl='pallas' runs the chunked form on the chunked delta-rule kernel; decoding keeps the state (d x d per "
          "head) and the short convs' last conv_size - 1 raw q, k, v inputs.")
CONV_SIZE = 4
NORM_EPS = 1e-5


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, allow_neg_eigval=False,
           bidirectional=None, norm_eps=NORM_EPS, impl="xla"):
    """The DeltaNet mixer on ``q, k, v [batch, length, heads, head_dim]``; returns ``[batch, length, heads,
    head_dim]`` in q's dtype, and the final state ``[batch, heads, head_dim, head_dim]`` (float32) too when
    ``return_state``.

    ``params``: ``beta [3 heads head_dim, heads]``, ``norm [head_dim]``; ``conv_q, conv_k, conv_v [taps, heads,
    head_dim]`` (absent: no short conv, SiLU only); ``gate [heads head_dim, heads head_dim]`` (absent: no output
    gate). ``initial_state`` and ``return_state`` need ``causal=True``. ``impl``: "xla", or a kernel backend for the
    chunked form (``delta_rule.delta_rule``).
    """
    return delta_method(NAME, q, k, v, params, mask=mask, segment_ids=segment_ids, causal=causal, form=form,
                        chunk_size=chunk_size, initial_state=initial_state, return_state=return_state,
                        allow_neg_eigval=allow_neg_eigval, bidirectional=bidirectional, norm_eps=norm_eps, impl=impl)


def delta_method(method, q, k, v, params, *, log_decay=None, mask=None, segment_ids=None, causal=False,
                 form="chunked", chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False,
                 allow_neg_eigval=False, bidirectional=None, norm_eps=NORM_EPS, impl="xla", history=None):
    """What DeltaNet and Gated DeltaNet share around the core: checks, both directions, the output dtype.

    ``log_decay(u, params) -> [batch, length, heads]`` (None: no decay) maps the auxiliary features to g <= 0.
    ``history [batch, conv_size - 1, 3, heads, head_dim]``: the raw q, k, v of the tokens before a causal call
    continuing a cache (a decoding step or extend, ``recurrent.decode``), which the short convs read before it
    (None: zeros).
    """
    check_qkv(method, q, k, v)
    check_impl(method, impl)
    recurrent.check_self(method, q, k)
    recurrent.refuse_bidirectional(method, causal, bidirectional)
    recurrent.check_form(method, form)
    recurrent.check_chunk_size(method, chunk_size)
    batch, _, heads, head_dim = q.shape
    recurrent.check_state(method, initial_state, (batch, heads, head_dim, head_dim))
    recurrent.check_carry(method, causal, initial_state, return_state)
    if history is not None and (not causal or segment_ids is not None):
        raise ValueError(f"{method}: history (a decoding step's conv inputs) needs causal=True and no segment_ids.")
    keep = recurrent.keep_mask(method, mask, *q.shape[:2])

    def one_direction(q, k, v, *, segment_ids=None, keep=None):
        return _causal_layer(method, q, k, v, params, log_decay=log_decay, keep=keep, segment_ids=segment_ids,
                             form=form, chunk_size=chunk_size, initial_state=initial_state,
                             allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, impl=impl, history=history)

    if causal:
        out, state = one_direction(q, k, v, segment_ids=segment_ids, keep=keep)
    else:
        out = recurrent.both_directions(lambda *a, **kw: one_direction(*a, **kw)[0], (q, k, v),
                                        segment_ids=segment_ids, keep=keep)
    out = out.astype(q.dtype)
    return (out, state) if return_state else out


def _causal_layer(method, q, k, v, params, *, log_decay, keep, segment_ids, form, chunk_size, initial_state,
                  allow_neg_eigval, norm_eps, impl, history):
    q, k, v = recurrent.zero_padded(keep, *(x.astype(jnp.float32) for x in (q, k, v)))
    u = recurrent.heads_flat(q, k, v)
    beta = jax.nn.sigmoid(u @ params["beta"])
    if allow_neg_eigval:
        beta = 2.0 * beta
    g = None if log_decay is None else log_decay(u, params)
    q_mix, k_mix, v_mix = (_short_conv(x, params.get(f"conv_{name}"), segment_ids,
                                       None if history is None else history[:, :, i])
                           for i, (x, name) in enumerate(((q, "q"), (k, "k"), (v, "v"))))
    q_mix = qk_l2_norm(q_mix) * q.shape[-1] ** -0.5
    out, state = delta_rule(q_mix, qk_l2_norm(k_mix), v_mix, beta, g, form=form, chunk_size=chunk_size,
                            initial_state=initial_state, segment_ids=segment_ids, mask=keep, method=method,
                            impl=impl)
    out = recurrent.rms_norm(out, params["norm"], norm_eps)
    if "gate" in params:
        out = out * jax.nn.silu((recurrent.heads_flat(v) @ params["gate"]).reshape(v.shape))
    return out, state


def _short_conv(x, taps, segment_ids, history=None):
    """SiLU(depthwise causal conv) that reads no other segment (and ``history`` before ``x``, a decoding step's);
    SiLU alone without taps."""
    if taps is None:
        return jax.nn.silu(x)
    return jax.nn.silu(recurrent.conv_after(history, x, lambda w: fftconv.short_causal(w, taps, None, segment_ids)))


def delta_params(module: nn.Module, heads: int, head_dim: int, *, use_short_conv: bool, conv_size: int,
                 use_gate: bool) -> dict:
    """The parameters DeltaNet and Gated DeltaNet share, created in ``module`` (inside its ``nn.compact`` call):
    the beta projection, the q/k/v conv taps, the output norm's scale and the output gate projection."""
    width = heads * head_dim
    params = {
        "beta": module.param("beta", torch_uniform(3 * width), (3 * width, heads), jnp.float32),
        "norm": module.param("norm", nn.initializers.ones, (head_dim,), jnp.float32),
    }
    if use_short_conv:  # depthwise: fan_in = taps
        for name in ("q", "k", "v"):
            params[f"conv_{name}"] = module.param(f"conv_{name}", torch_uniform(conv_size),
                                                  (conv_size, heads, head_dim), jnp.float32)
    if use_gate:
        params["gate"] = module.param("gate", torch_uniform(width), (width, width), jnp.float32)
    return params


class Attention(nn.Module):
    """The DeltaNet mixer with fla's defaults (see the module docstring for the departures).

    ``form`` picks the core's form (``recurrent.FORMS``); ``chunk_size`` is the chunked form's chunk.
    ``bidirectional``: None (``causal=False`` refused) or "sum". ``dropout_rate`` is accepted and unused.
    Gated DeltaNet's module is this one plus a decay (``decay_params``, ``log_decay``).
    """

    use_short_conv: bool = True
    conv_size: int = CONV_SIZE
    allow_neg_eigval: bool = False
    use_gate: bool = False
    norm_eps: float = NORM_EPS
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bidirectional: str | None = None
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the chunked form on kernels.delta_rule

    method_name = NAME  # the name errors carry
    log_decay = None  # (u, params) -> g [batch, length, heads]; None: no decay

    def decay_params(self, heads: int, head_dim: int) -> dict:
        """The decay's parameters (none for DeltaNet)."""
        return {}

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The state ``[batch, heads, d, d]`` float32 and, with the short convs, the last ``conv_size - 1`` raw
        q, k, v ``[batch, conv_size - 1, 3, heads, d]`` in ``dtype`` (``recurrent.init_cache``; ``max_length``
        unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype,
                                    history=self.conv_size - 1 if self.use_short_conv else 0)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``."""
        check_qkv(self.method_name, q, k, v)
        heads, head_dim = q.shape[2], q.shape[3]
        params = delta_params(self, heads, head_dim, use_short_conv=self.use_short_conv, conv_size=self.conv_size,
                              use_gate=self.use_gate)
        params.update(self.decay_params(heads, head_dim))
        call = dict(log_decay=type(self).log_decay, mask=mask, segment_ids=segment_ids, causal=causal, form=self.form,
                    chunk_size=self.chunk_size, allow_neg_eigval=self.allow_neg_eigval,
                    bidirectional=self.bidirectional, norm_eps=self.norm_eps, impl=self.impl)
        method = functools.partial(delta_method, self.method_name)
        if cache is None:
            return method(q, k, v, params, **call)
        return recurrent.decode(self.method_name, method, q, k, v, params, cache, positions=positions,
                                streams=jnp.stack([q, k, v], axis=2), **call)

"""RWKV-7 "Goose" time mixing (Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State Evolution", 2025,
arXiv 2503.14456; BlinkDL/RWKV-LM ``RWKV-v7/rwkv_v7_numpy.py`` and ``train_temp/src/model.py``) over q, k, v.

Per head, with the receptance r = q, and x_* the token-shifted inputs (below):
    w     = exp(-e^-0.5 sigmoid(w0 + tanh(x_w W1) W2))      decay per key channel, in [exp(-0.6065), 1)
    alpha = sigmoid(a0 + x_a A1 A2)                          in-context learning rate
    g     = sigmoid(x_g G1) G2                               output gate
    kappa = L2norm_head(k * k_k)                             removal key
    k~    = k * (1 + (alpha - 1) * k_a)                      write key ("relaxed value replacement")
    S_t   = S_{t-1} (Diag(w_t) - kappa_t (alpha_t kappa_t)^T) + v_t k~_t^T,   y_t = S_t r_t    (S [d_v, d_k])
    out   = (GroupNorm_head(y) + (sum_d r * k~ * r_k) v) * g    (GroupNorm eps head_dim * 1e-5, scale 1)
The recurrence runs on ``effjax.attention.dplr`` in effjax's [d_k, d_v] layout (``a = -kappa``,
``b = alpha * kappa``), in its three forms (``form``: "chunked", "parallel", "recurrent").

Initialisation as the official ``RWKV_Tmix_x070`` for layer ``layer_idx`` of ``num_layers`` with C = heads *
head_dim: shift mixes ``1 - (n/C)^(p (1 - l/L))`` (p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2 for r, w, k, v, a, g);
``w0 = -6 + 6 (n/(C-1))^(1 + (l/(L-1))^0.3) + 0.5 + 2.5 zigzag``; ``a0 = -0.19 + 0.3 zigzag + 0.4 linear``;
``k_k = 0.71 - 0.1 linear``, ``k_a = 1.02``, ``r_k = -0.04``; GroupNorm weight ``((l+1)/L)^0.7``, bias 0; the
LoRAs' first matrices zero, the second orthogonal with gain 0.1 (times sqrt(rows/cols) when rows > cols). LoRA
ranks (fields ``decay_rank``, ``a_rank``, ``gate_rank``; None: the formula) as fla's layer: ``max(32,
round(2.5 sqrt(C) head_dim/64 / 32) * 32)`` for the decay and alpha, ``max(32, round(5 sqrt(C) / 32) * 32)`` for
the gate.

Departures from the paper (the method sees projected q, k, v, not the hidden state x; catalog Sec. 2.7, 3.6):
  1. Token shift: the official shift mixes x before the projections (``x_* = x + mu_* (x_{t-1} - x)``). Here it is
     a per-channel 2-tap shift-mix on the projected q, k, v (``mu_r, mu_k, mu_v``: a special short conv), and the
     LoRAs of w, alpha and g read ``u = concat_heads(q, k, v)`` (``recurrent.heads_flat``, 3 C features)
     shifted with their own mixes ``mu_w, mu_a, mu_g`` (initialised by each channel's index within its q, k or v
     part). Diag(mu) does not commute with a projection, so the parameterisation differs.
  2. No v_first value residual (``v += (v_first - v) sigmoid(v0 + x_v V1 V2)`` in layers after the first): it
     needs layer 0's values, which one layer cannot see; every layer acts like the official layer 0.
  3. The head size is the block's (the official code asserts 64); C above is heads * head_dim, and the LoRA input
     width is 3 C.
  4. ``causal=False`` is not defined by the paper and refused unless ``bidirectional="sum"`` (a forward plus a
     reversed scan with the same parameters, ``recurrent.both_directions``; the diagonal counts twice).
  5. ``initial_state``/``return_state`` carry the matrix state only, not the one-token shift cache: a call
     continuing a sequence reads a zero previous token at its first position. Decoding (``init_cache``,
     ``cache``/``positions``; ``recurrent.decode``) does carry it: the cache holds the matrix state and the raw
     q, k, v of the previous token (``history``), which a step's token shifts read, so prefill plus steps equal
     the forward pass.
No output projection (the block's) and no dropout (``dropout_rate`` is accepted for the common interface and
unused). Padded tokens (``mask`` False) are zeroed before the shift, leave the state unchanged and output 0;
segments restart the state and the shift reads 0 across them. Computation in float32, output in q's dtype.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import dplr, fftconv, recurrent
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, l2_normalize

NAME = "rwkv7"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=False, decode=True, extend=True,
    notes="causal=False is refused unless bidirectional='sum' (forward plus reversed scan); forms chunked, "
          "parallel and recurrent of the DPLR core (effjax.attention.dplr); decoding keeps the state (d x d per "
          "head) and the token shift's previous raw q, k, v.")
DEFAULT_CHUNK_SIZE = dplr.DEFAULT_CHUNK_SIZE
DECAY_SCALE = math.exp(-0.5)  # the official kernel's W_SCALE 0.6065: log w in [-0.6065, 0)
SHIFT_POWERS = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}


def lora_rank(width: int, multiplier: float, factor: float = 1.0) -> int:
    """``max(32, round(multiplier sqrt(width) factor / 32) * 32)``: the official suggestion, fla's head-dim factor."""
    return max(32, int(round(multiplier * math.sqrt(width) * factor / 32) * 32))


def token_shift(x, mix, segment_ids=None):
    """``x + mix (x_{t-1} - x)`` along the length, reading 0 before the first token and across segments."""
    return fftconv.short_causal(x, jnp.stack([1.0 - mix, mix]), None, segment_ids)


def time_mixing(q, k, v, params, *, segment_ids=None, history=None):
    """The per-token quantities of the recurrence from q, k, v (float32, ``[batch, length, heads, head_dim]``).

    ``history [batch, 1, 3, heads, head_dim]``: the raw q, k, v of the token before a call continuing a
    cache (a decoding step or extend), which the shifts read (``recurrent.conv_after``; None: zeros). Returns a
    dict: ``r`` (receptance), ``log_w`` (log decay), ``alpha`` (in-context rate), ``kappa`` (removal key, unit norm
    per head), ``k`` (write key k~), ``v`` (shifted values) and ``g`` (output gate).
    """
    shape = q.shape
    before = (None,) * 3 if history is None else tuple(history[:, :, i] for i in range(3))

    def shift(x, mix, previous):
        return recurrent.conv_after(previous, x, lambda window: token_shift(window, mix, segment_ids))

    r = shift(q.astype(jnp.float32), params["mix_r"], before[0])
    key = shift(k.astype(jnp.float32), params["mix_k"], before[1])
    value = shift(v.astype(jnp.float32), params["mix_v"], before[2])
    u = recurrent.heads_flat(q, k, v)
    u_before = None if history is None else recurrent.heads_flat(*before)
    u_w, u_a, u_g = (shift(u, params[f"mix_{n}"], u_before) for n in "wag")
    decay_logit = params["w0"] + jnp.tanh(u_w @ params["w1"]) @ params["w2"]
    log_w = -DECAY_SCALE * jax.nn.sigmoid(decay_logit.reshape(shape))
    alpha = jax.nn.sigmoid((params["a0"] + (u_a @ params["a1"]) @ params["a2"]).reshape(shape))
    gate = (jax.nn.sigmoid(u_g @ params["g1"]) @ params["g2"]).reshape(shape)
    kappa = l2_normalize(key * params["k_k"], axis=-1)
    write = key * (1.0 + (alpha - 1.0) * params["k_a"])
    return {"r": r, "log_w": log_w, "alpha": alpha, "kappa": kappa, "k": write, "v": value, "g": gate}


def group_norm(y, scale, bias, eps):
    """Per-head GroupNorm over ``[..., heads, head_dim]`` (population variance), then ``scale``, ``bias``."""
    centered = y - jnp.mean(y, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps) * scale + bias


def one_direction(q, k, v, params, *, segment_ids=None, keep=None, form="chunked", chunk_size=DEFAULT_CHUNK_SIZE,
                  initial_state=None, norm_eps=1e-5, history=None):
    """RWKV-7 left to right: ``(out float32 [batch, length, heads, head_dim], final_state)``; ``history``: see
    ``time_mixing``."""
    q, k, v = recurrent.zero_padded(keep, *(x.astype(jnp.float32) for x in (q, k, v)))
    m = time_mixing(q, k, v, params, segment_ids=segment_ids, history=history)
    y, state = dplr.dplr(m["r"], m["k"], m["v"], m["log_w"], -m["kappa"], m["alpha"] * m["kappa"], form=form,
                         chunk_size=chunk_size, initial_state=initial_state, segment_ids=segment_ids, mask=keep,
                         method=NAME)
    y = group_norm(y, params["norm_scale"], params["norm_bias"], q.shape[-1] * norm_eps)
    bonus = jnp.sum(m["r"] * m["k"] * params["r_k"], axis=-1, keepdims=True) * m["v"]
    out = (y + bonus) * m["g"]
    if keep is not None:
        out = jnp.where(keep[:, :, None, None], out, 0.0)
    return out, state


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, bidirectional=None,
           norm_eps=1e-5, history=None):
    """RWKV-7 over ``q, k, v [batch, length, heads, head_dim]`` with ``params`` (``declare_params``).

    Causal: ``causal=True``; ``causal=False`` needs ``bidirectional="sum"``. ``initial_state`` (float32
    ``[batch, heads, head_dim, head_dim]``) and ``return_state`` (then ``(out, final_state)``) are for the
    causal scan, as is ``history`` (a decoding step's previous raw q, k, v, ``time_mixing``). Returns ``[batch,
    length, heads, head_dim]`` in q's dtype.
    """
    check_qkv(NAME, q, k, v)
    recurrent.check_self(NAME, q, k)
    recurrent.refuse_bidirectional(NAME, causal, bidirectional)
    recurrent.check_form(NAME, form)
    if form == "chunked":
        recurrent.check_chunk_size(NAME, chunk_size)
    keep = recurrent.keep_mask(NAME, mask, *q.shape[:2])
    call = dict(form=form, chunk_size=chunk_size, norm_eps=norm_eps)
    recurrent.check_carry(NAME, causal, initial_state, return_state)
    if history is not None and (not causal or segment_ids is not None):
        raise ValueError(f"{NAME}: history (a decoding step's previous token) needs causal=True and no segment_ids.")
    if causal:
        out, state = one_direction(q, k, v, params, segment_ids=segment_ids, keep=keep,
                                   initial_state=initial_state, history=history, **call)
        return (out.astype(q.dtype), state) if return_state else out.astype(q.dtype)

    def scan(q, k, v, *, segment_ids, keep):
        return one_direction(q, k, v, params, segment_ids=segment_ids, keep=keep, **call)[0]

    return recurrent.both_directions(scan, (q, k, v), segment_ids=segment_ids, keep=keep).astype(q.dtype)


def _channel_profiles(heads: int, head_dim: int, layer_idx: int, num_layers: int):
    """The official init's per-channel profiles over C = heads * head_dim channels (``RWKV_Tmix_x070.__init__``)."""
    width = heads * head_dim
    n = jnp.arange(width, dtype=jnp.float32)
    linear = n / max(width - 1, 1) - 0.5
    half = (head_dim - 1) / 2
    zigzag = ((n % head_dim) - half) / half if head_dim > 1 else jnp.zeros_like(n)
    zigzag = zigzag * jnp.abs(zigzag)
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0  # ratio_0_to_1
    decay = -6.0 + 6.0 * (n / max(width - 1, 1)) ** (1.0 + depth ** 0.3)
    return {"fraction": n / width, "linear": linear, "zigzag": zigzag, "decay": decay,
            "remaining": 1.0 - layer_idx / num_layers}  # ratio_1_to_almost0


def _lora_out_init(scale: float = 0.1):
    """The official ``ortho_init(x, 0.1)``: orthogonal, gain sqrt(rows/cols) when rows > cols, times ``scale``."""
    def init(key, shape, dtype=jnp.float32):
        gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
        return nn.initializers.orthogonal(scale=gain * scale)(key, shape, dtype)
    return init


def declare_params(module: nn.Module, heads: int, head_dim: int) -> dict:
    """RWKV-7's time-mixing parameters declared on ``module`` (which has ``layer_idx``, ``num_layers``,
    ``decay_rank``, ``a_rank``, ``gate_rank``), with the official init (module docstring)."""
    width = heads * head_dim
    profile = _channel_profiles(heads, head_dim, module.layer_idx, module.num_layers)
    factor = head_dim / 64
    ranks = {"w": module.decay_rank or lora_rank(width, 2.5, factor),
             "a": module.a_rank or lora_rank(width, 2.5, factor),
             "g": module.gate_rank or lora_rank(width, 5.0)}
    per_head, aux = (heads, head_dim), (3 * width,)

    def const(name, values, shape):
        return module.param(name, lambda key: jnp.broadcast_to(jnp.asarray(values, jnp.float32), shape))

    def shift_mix(name, shape):
        fraction = profile["fraction"] if shape == per_head else jnp.tile(profile["fraction"], 3)
        mix = 1.0 - fraction ** (SHIFT_POWERS[name] * profile["remaining"])
        return const(f"mix_{name}", mix.reshape(shape), shape)

    params = {f"mix_{n}": shift_mix(n, per_head) for n in "rkv"}
    params.update({f"mix_{n}": shift_mix(n, aux) for n in "wag"})
    params["w0"] = const("w0", profile["decay"] + 0.5 + 2.5 * profile["zigzag"], (width,))
    params["a0"] = const("a0", -0.19 + 0.3 * profile["zigzag"] + 0.4 * profile["linear"], (width,))
    for n in "wag":
        params[f"{n}1"] = module.param(f"{n}1", nn.initializers.zeros, (3 * width, ranks[n]), jnp.float32)
        params[f"{n}2"] = module.param(f"{n}2", _lora_out_init(), (ranks[n], width), jnp.float32)
    params["k_k"] = const("k_k", (0.71 - 0.1 * profile["linear"]).reshape(per_head), per_head)
    params["k_a"] = const("k_a", 1.02, per_head)
    params["r_k"] = const("r_k", -0.04, per_head)
    params["norm_scale"] = const("norm_scale", ((module.layer_idx + 1) / module.num_layers) ** 0.7, per_head)
    params["norm_bias"] = const("norm_bias", 0.0, per_head)
    return params


class Attention(nn.Module):
    """RWKV-7 time mixing over the block's q (receptance), k and v (module docstring for the departures).

    ``layer_idx``/``num_layers`` set the layer-dependent init; ``decay_rank``, ``a_rank``, ``gate_rank`` the
    LoRA ranks (None: the formulas); ``norm_eps`` times head_dim is the GroupNorm eps. ``form`` and
    ``chunk_size`` pick the DPLR core's form. ``bidirectional="sum"`` allows ``causal=False``.
    ``dropout_rate`` is accepted for the common interface and unused (the paper has no dropout here).
    """

    layer_idx: int = 0
    num_layers: int = 1
    decay_rank: int | None = None
    a_rank: int | None = None
    gate_rank: int | None = None
    norm_eps: float = 1e-5
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bidirectional: str | None = None
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The state ``[batch, heads, d, d]`` float32 and the token shift's previous raw q, k, v ``[batch, 1, 3,
        heads, d]`` in ``dtype`` (``recurrent.init_cache``; ``max_length`` unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype, history=1)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        recurrent.check_self(NAME, q, k)
        recurrent.refuse_bidirectional(NAME, causal, self.bidirectional)
        recurrent.check_form(NAME, self.form)
        if self.form == "chunked":
            recurrent.check_chunk_size(NAME, self.chunk_size)
        if not 0 <= self.layer_idx < self.num_layers:
            raise ValueError(f"{NAME}: layer_idx must be in [0, num_layers = {self.num_layers}), "
                             f"got {self.layer_idx}.")
        params = declare_params(self, q.shape[2], q.shape[3])
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, form=self.form, chunk_size=self.chunk_size,
                    bidirectional=self.bidirectional, norm_eps=self.norm_eps)
        if cache is None:
            return attend(q, k, v, params, **call)
        return recurrent.decode(NAME, attend, q, k, v, params, cache, positions=positions,
                                streams=jnp.stack([q, k, v], axis=2), **call)


class _ParamsOnly(Attention):
    """``Attention``'s parameters alone (same names and init), without running the method."""

    @nn.compact
    def __call__(self, heads, head_dim):
        return declare_params(self, heads, head_dim)


def init_params(key, heads: int, head_dim: int, **fields) -> dict:
    """The parameters ``Attention(**fields)`` makes for ``heads`` x ``head_dim`` (for ``attend``), without a call."""
    return _ParamsOnly(**fields).init(key, heads, head_dim)["params"]

"""Primer Multi-DConv-Head Attention (So et al., NeurIPS 2021, Sec. 3, Fig. 4): width-3 depthwise convs on q, k, v.

``share_qk=True`` is full Primer's shared Q/K representation (the paper's Sec. 3 / App. model description; the
released code's ``share_qk_rep``, attention ``mdha_shared_qk`` in google-research ``primer/t5_models.py``): one
projection ``r = x W_q``, one causal depthwise conv ``r' = dconv_qk(r)``, then ``K = r'`` and
``Q = r' W_q_solo`` with ``W_q_solo`` a full ``[heads * head_dim, heads * head_dim]`` matrix (no bias); there is
no key projection (``projections``), V is ``dconv_v(x W_v)`` as in MDHA.
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout_kwargs

NAME = "primer_mdha"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=True, dropout=True, pallas=False,
    decode=True, extend=True,
    notes="centered=True refuses causal=True (the centred conv reads the next token), and so decoding. "
          "share_qk=True (full Primer) makes K from q: self-attention only, k is not read. Decoding keeps a key/value "
          "cache of max_length convolved keys/values and the last 2 inputs of each convolved stream (q, k, v; "
          "with share_qk the shared representation and v).",
)
HISTORY_AXES = ("batch", None, "heads", "head_dim")
WIDTH = 3


def projections(params: dict) -> tuple[str, ...]:
    """The model's input projections: no key projection with ``share_qk`` (K is the shared representation)."""
    return ("query", "value") if params.get("share_qk") else ("query", "key", "value")


def tap_offsets(centered: bool) -> tuple[int, ...]:
    """Position offset read by each kernel tap: (0, -1, -2) causal as in Primer, (0, -1, +1) centred."""
    return (0, -1, 1) if centered else (0, -1, -2)


def _shift(x, offset):
    """y_t = x_{t + offset} along axis 1, zero where t + offset falls outside [0, length)."""
    if offset == 0:
        return x
    length = x.shape[1]
    if abs(offset) >= length:
        return jnp.zeros_like(x)
    widths = [(0, 0)] * x.ndim
    if offset < 0:
        widths[1] = (-offset, 0)
        return jnp.pad(x, widths)[:, :length]
    widths[1] = (0, offset)
    return jnp.pad(x, widths)[:, offset:]


def depthwise_conv(x, kernel, *, segment_ids=None, centered=False):
    """Per-(head, channel) conv along length: ``y_t = sum_s kernel[s] * x_{t + offset_s}``, zero-filled.

    ``x [batch, length, heads, head_dim]``, ``kernel [3, heads, head_dim]``; float32 out. With
    ``segment_ids`` a tap that would read another segment reads zero instead.
    """
    if kernel.shape != (WIDTH,) + x.shape[2:]:
        raise ValueError(f"{NAME}: conv kernel must have shape {(WIDTH,) + x.shape[2:]}, got {kernel.shape}.")
    x = x.astype(jnp.float32)
    kernel = kernel.astype(jnp.float32)
    out = jnp.zeros_like(x)
    for tap, offset in enumerate(tap_offsets(centered)):
        shifted = _shift(x, offset)
        if segment_ids is not None and offset != 0:
            same = _shift(segment_ids[..., None], offset)[..., 0] == segment_ids
            # _shift fills with 0, which could equal a real id: positions read from outside never match.
            inside = _shift(jnp.ones_like(segment_ids)[..., None], offset)[..., 0] == 1
            shifted = jnp.where((same & inside)[:, :, None, None], shifted, 0.0)
        out = out + kernel[tap] * shifted
    return out


def _zero_padding(q, k, v, *, mask, segment_ids, causal, centered):
    """q, k, v with padded positions zeroed (q only in self-attention); checks the call's options."""
    if centered and causal:
        raise NotImplementedError(f"{NAME}: causal=True is not supported with centered=True: the centred conv "
                                  "reads the next token; use the default causal conv.")
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    if mask is not None:
        real = check_mask(NAME, mask, batch, kv_len)[:, :, None, None]
        k, v = jnp.where(real, k, 0), jnp.where(real, v, 0)
        if q_len == kv_len:
            q = jnp.where(real, q, 0)
    if segment_ids is not None and (q_len != kv_len or segment_ids.shape != (batch, q_len)):
        raise ValueError(f"{NAME}: segment_ids must have shape [batch, length] = {(batch, q_len)} for "
                         f"self-attention, got {segment_ids.shape} with kv_len {kv_len}.")
    return q, k, v


def attend(q, k, v, q_kernel, k_kernel, v_kernel, *, mask=None, segment_ids=None, causal=False, centered=False,
           dropout_rate=0.0, dropout_rng=None):
    """softmax attention on depthwise-convolved q, k, v (kernels ``[3, heads, head_dim]`` each).

    The conv is causal (taps t, t-1, t-2) as in Primer's code for every mode; ``centered=True`` (taps t, t-1,
    t+1) is our option for bidirectional use and refuses ``causal=True``. Padded positions (``mask``
    False) of k and v, and of q in self-attention (q_len == kv_len), are zeroed before the conv, so they
    reach no real output; ``segment_ids`` stop the conv at segment boundaries. With kernels (1, 0, 0) this
    is exactly ``softmax.attend``.
    """
    check_qkv(NAME, q, k, v)
    q, k, v = _zero_padding(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, centered=centered)
    conv = dict(segment_ids=segment_ids, centered=centered)
    qc = depthwise_conv(q, q_kernel, **conv)
    kc = depthwise_conv(k, k_kernel, **conv)
    vc = depthwise_conv(v, v_kernel, **conv)
    out = softmax.attend(qc, kc, vc, mask=mask, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng)
    return out.astype(q.dtype)


def attend_shared_qk(r, v, qk_kernel, v_kernel, q_solo, *, mask=None, segment_ids=None, causal=False,
                     centered=False, dropout_rate=0.0, dropout_rng=None):
    """Full Primer's attention on the shared representation ``r = x W_q`` (self-attention only).

    ``r' = dconv(r, qk_kernel)``, ``K = r'``, ``Q = einsum(r', q_solo)`` with ``q_solo [heads, head_dim, heads,
    head_dim]`` (a full matrix over heads x head_dim, mixing heads), ``V = dconv(v, v_kernel)``, then softmax
    attention. Padding and segments act as in ``attend``: padded positions of r and v are zeroed before the convs
    and masked as keys, and ``segment_ids`` stop the convs at segment boundaries.
    """
    check_qkv(NAME, r, r, v)
    if v.shape[1] != r.shape[1]:
        raise ValueError(f"{NAME}: share_qk=True is self-attention only: v has length {v.shape[1]}, the shared "
                         f"representation {r.shape[1]}.")
    expected = r.shape[2:] * 2
    if q_solo.shape != expected:
        raise ValueError(f"{NAME}: q_solo must have shape {expected}, got {q_solo.shape}.")
    r, _, v = _zero_padding(r, r, v, mask=mask, segment_ids=segment_ids, causal=causal, centered=centered)
    conv = dict(segment_ids=segment_ids, centered=centered)
    kc = depthwise_conv(r, qk_kernel, **conv)
    vc = depthwise_conv(v, v_kernel, **conv)
    qc = shared_query(kc, q_solo)
    out = softmax.attend(qc, kc, vc, mask=mask, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng)
    return out.astype(r.dtype)


def shared_query(kc, q_solo):
    """Full Primer's ``Q = r' W_q_solo`` from the convolved shared representation ``r' = K`` (float32)."""
    return jnp.einsum("blhd,hdge->blge", kc, q_solo.astype(jnp.float32))


def decode(streams, cache, positions, mask, q_solo=None, *, dropout):
    """A decoding call (``effjax.attention.decoding``) of causal MDHA: ``streams`` maps each convolved stream
    (``q``, ``k``, ``v``; with ``share_qk`` ``qk`` and ``v``) to ``(input, kernel)``.

    Prefill: the inputs with padding zeroed, their convs and the forward's causal softmax; the cache keeps the
    convolved keys/values (``kv``) and each stream's last 2 real inputs (``history``, ``decoding.conv_history``).
    Step or extend: each stream's conv over its history and the new inputs (the forward's taps on the same
    values; the history keeps the last 2 real ones), then ``decoding.kv_decode`` over the cached convolved keys.
    """
    dtype = next(iter(streams.values()))[0].dtype
    history = dict(cache["history"])
    if positions is None:
        x = {name: value for name, (value, _) in streams.items()}
        if "qk" in x:
            x["qk"], _, x["v"] = _zero_padding(x["qk"], x["qk"], x["v"], mask=mask, segment_ids=None, causal=True,
                                               centered=False)
        else:
            x["q"], x["k"], x["v"] = _zero_padding(x["q"], x["k"], x["v"], mask=mask, segment_ids=None, causal=True,
                                                   centered=False)
        conv = {name: depthwise_conv(x[name], kernel) for name, (_, kernel) in streams.items()}
        for name in streams:
            history[name] = decoding.conv_history(x[name], mask, WIDTH - 1).astype(history[name].dtype)
    else:  # a step or an extend: each stream's conv over its history and the new inputs (the forward's taps)
        conv = {}
        for name, (value, kernel) in streams.items():
            conv[name], history[name] = decoding.conv_step(history[name], value,
                                                           lambda w, kernel=kernel: depthwise_conv(w, kernel), mask)
    qc = shared_query(conv["qk"], q_solo) if q_solo is not None else conv["q"]
    kc = conv["qk"] if q_solo is not None else conv["k"]
    out, kv = decoding.kv_decode(NAME, qc, kc, conv["v"], cache["kv"], positions, mask,
                                 forward=lambda: softmax.attend(qc, kc, conv["v"], mask=mask, causal=True, **dropout))
    return out.astype(dtype), {"kv": kv, "history": history}


def primer_init(key, shape, dtype=jnp.float32):
    """Primer's initial kernel: 0.5 on the current token, 0.5 / 3 on each other tap."""
    del key
    taps = jnp.array([0.5] + [0.5 / WIDTH] * (WIDTH - 1), dtype)
    return jnp.broadcast_to(taps.reshape((WIDTH,) + (1,) * (len(shape) - 1)), shape)


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the three ``[3, heads, head_dim]`` kernels (``q_dconv``,
    ``k_dconv``, ``v_dconv``), sized at init and initialised as Primer's code (0.5, 0.5/3, 0.5/3).
    ``centered`` is our bidirectional option (see ``attend``).

    ``share_qk`` (full Primer, ``attend_shared_qk``): ``q`` is the shared representation and ``k`` is not read
    (pass ``k = q``; the model does, making no key projection); the module owns ``qk_dconv`` and ``v_dconv``
    ``[3, heads, head_dim]`` and ``q_solo [heads, head_dim, heads, head_dim]`` (Glorot-uniform over the
    combined heads x head_dim axes)."""

    centered: bool = False
    share_qk: bool = False  # full Primer's shared Q/K representation (the code's share_qk_rep)
    dropout_rate: float = 0.0

    def stream_names(self) -> tuple[str, ...]:
        """The convolved streams, each with its kernel ``<name>_dconv``: q, k, v (MDHA) or qk, v (``share_qk``)."""
        return ("qk", "v") if self.share_qk else ("q", "k", "v")

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"kv": the key/value cache of max_length slots of the convolved keys/values, "history": {stream:
        its last 2 inputs [batch, 2, heads, head_dim]}}`` (``effjax.attention.decoding``, ``decode``)."""
        self.check_decodes()
        history = {name: decoding.boxed_zeros((batch, WIDTH - 1, heads, head_dim), dtype, HISTORY_AXES)
                   for name in self.stream_names()}
        return {"kv": decoding.kv_init(batch, max_length, heads, head_dim, dtype), "history": history}

    def check_decodes(self):
        if self.centered:
            raise NotImplementedError(f"{NAME}: decoding is causal, which centered=True refuses (the centred conv "
                                      "reads the next token); use the default causal conv.")

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        shape = (WIDTH,) + q.shape[2:]
        if self.share_qk and k.shape != q.shape:
            raise ValueError(f"{NAME}: share_qk=True makes K from q (self-attention only): pass k = q, got q "
                             f"{q.shape} and k {k.shape}.")
        kernels = [self.param(f"{name}_dconv", primer_init, shape, jnp.float32) for name in self.stream_names()]
        q_solo = None
        if self.share_qk:
            solo_init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=(2, 3))
            q_solo = self.param("q_solo", solo_init, q.shape[2:] * 2, jnp.float32)
        dropout = dropout_kwargs(self, deterministic)
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
            self.check_decodes()
            inputs = (q, v) if self.share_qk else (q, k, v)
            streams = dict(zip(self.stream_names(), zip(inputs, kernels, strict=True), strict=True))
            return decode(streams, cache, positions, mask, q_solo, dropout=dropout)
        if self.share_qk:
            return attend_shared_qk(q, v, *kernels, q_solo, mask=mask, segment_ids=segment_ids, causal=causal,
                                    centered=self.centered, **dropout)
        return attend(q, k, v, *kernels, mask=mask, segment_ids=segment_ids, causal=causal, centered=self.centered,
                      **dropout)

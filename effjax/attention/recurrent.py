"""What the linear-attention and state-space families share (catalog ``linear_families.md`` Sec. 2.7-2.9).

The families (``retnet``, ``gla``, ``hgrn2``, ``mamba2``: decayed linear attention, ``gated_linear``;
``deltanet``, ``gated_deltanet``: the delta rule, ``delta_rule``; ``rwkv7``: the generalized delta rule, ``dplr``)
keep a state ``S [batch, heads, d_k, d_v]`` (float32) per sequence and read ``o_t = S_t^T q_t``. Each comes in
three forms that must agree (``FORMS``): ``parallel`` (materialised, quadratic: the reference), ``chunked``
(parallel inside a chunk, the state passed between chunks: what trains) and ``recurrent`` (one token at a time:
what decodes). Every form takes an ``initial_state`` and returns the final state, so a sequence can be cut
anywhere and continued.

Conventions shared by every form of every family:
  * padding (``mask`` False): the token leaves the state unchanged (its key, value, write strength and
    log-decay are zeroed) and its output is 0;
  * packing (``segment_ids``): ids become runs (``run_starts``), so A-B-A packs never reconnect; the state
    restarts from 0 at every run start after position 0, and the ``initial_state`` belongs to the first run;
  * causal by nature: ``causal=False`` is refused unless the method defines a bidirectional form
    (``refuse_bidirectional``; ``both_directions`` is Sec. 2.9's forward plus reversed scan).

Decoding (``effjax.attention.decoding``), the same for every method (``init_cache``, ``decode``): the cache is the
state plus, for a method with short convolutions or a token shift, the raw inputs of the last tokens they read
(``history``), a constant size whatever ``max_length``; a prefill is the method's ordinary forward with the mask
(pads leave the state unchanged), a step its recurrent form from the cached state (``conv_after`` continues the
convolutions from the history).
"""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.attention import decoding

FORMS = ("chunked", "parallel", "recurrent")
MAX_CHUNK = 1024  # the largest chunk of the XLA forms: a chunk's [chunk, chunk] (or [chunk, chunk, d_k]) tiles


def check_form(method: str, form) -> None:
    if form not in FORMS:
        raise ValueError(f"{method}: form must be one of {', '.join(map(repr, FORMS))}, got {form!r}.")


def check_chunk_size(method: str, chunk_size) -> None:
    """Raises ValueError unless ``chunk_size`` is a power of two in [1, MAX_CHUNK]."""
    ok = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and 1 <= chunk_size <= MAX_CHUNK
    if not ok or chunk_size & (chunk_size - 1):
        raise ValueError(f"{method}: chunk_size must be a power of two between 1 and {MAX_CHUNK}, got {chunk_size!r}.")


def check_state(method: str, state, shape: tuple) -> None:
    """Raises ValueError unless ``state`` (None allowed) is float32 of ``shape`` ``[batch, heads, d_k, d_v]``."""
    if state is None:
        return
    if tuple(state.shape) != tuple(shape) or state.dtype != jnp.float32:
        raise ValueError(f"{method}: initial_state must be float32 of shape [batch, heads, d_k, d_v] = {tuple(shape)}, "
                         f"got {state.dtype} {tuple(state.shape)}.")


def check_carry(method: str, causal: bool, initial_state, return_state: bool) -> None:
    """Refuses a carried state without ``causal``: a state is what a left-to-right pass leaves behind."""
    if not causal and (initial_state is not None or return_state):
        raise ValueError(f"{method}: initial_state and return_state need causal=True (a state is carried left to "
                         "right; the bidirectional form has none).")


def check_log_decay(method: str, log_decay, label: str = "log_decay") -> None:
    """ValueError unless every log-decay is finite and ``<= 0`` (decays in (0, 1]). Only values known here are
    checked: a traced ``log_decay`` (under ``jit``) is the caller's to guarantee, as the methods' gates do by
    construction."""
    if log_decay is None or isinstance(log_decay, jax.core.Tracer):
        return
    values = np.asarray(log_decay, np.float64)
    bad = ~(np.isfinite(values) & (values <= 0))
    if bad.any():
        raise ValueError(f"{method}: {label} must be finite and <= 0 (decays in (0, 1]), got "
                         f"{values[bad].flat[0]!r} at index {tuple(int(i) for i in np.argwhere(bad)[0])}.")


def check_self(method: str, q, k) -> None:
    """Refuses cross attention: a recurrence reads the state at the query's own position."""
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError(f"{method}: cross attention (q_len {q.shape[1]} != kv_len {k.shape[1]}) is not "
                                  "supported: the query reads the recurrent state at its own position.")


def keep_mask(method: str, mask, batch: int, length: int):
    """The key-padding mask as bool ``[batch, length]`` (True: real token), or None."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{method}: mask must have shape [batch, length] = {(batch, length)}, "
                         f"got {tuple(mask.shape)}.")
    return jnp.asarray(mask).astype(bool)


def run_starts(method: str, segment_ids, batch: int, length: int):
    """Bool ``[batch, length]``: True where a token's segment differs from the previous token's (never at 0).

    Comparing neighbours makes runs of equal ids the unit, so ids that repeat later (A-B-A) start a new run.
    """
    if segment_ids is None:
        return None
    if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"{method}: segment_ids must have shape [batch, length] = {(batch, length)}, "
                         f"got {tuple(segment_ids.shape)}.")
    ids = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def run_ids(starts, batch: int, length: int):
    """int32 ``[batch, length]`` run index (0 for the first run), from ``run_starts`` (None: all zeros)."""
    if starts is None:
        return jnp.zeros((batch, length), jnp.int32)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def zero_padded(keep, *per_token):
    """Each ``[batch, length, ...]`` array (or None) set to 0 where ``keep`` is False (``keep`` None: unchanged)."""
    if keep is None:
        return per_token
    return tuple(None if x is None else jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0)
                 for x in per_token)


def refuse_bidirectional(method: str, causal: bool, bidirectional) -> None:
    """Refuses ``causal=False`` unless ``bidirectional`` names a form ("sum": ``both_directions``)."""
    if bidirectional not in (None, "sum"):
        raise ValueError(f"{method}: bidirectional must be None or 'sum', got {bidirectional!r}.")
    if not causal and bidirectional is None:
        raise NotImplementedError(
            f"{method}: causal=False is not defined by the paper (a recurrence runs left to right); call it with "
            "causal=True, or set bidirectional='sum' for a forward plus a reversed scan (as BiHGRN2).")


def both_directions(one_direction, per_token: tuple, *, segment_ids=None, keep=None):
    """``one_direction(*per_token, segment_ids, keep) + flip(one_direction(flipped ...))`` (catalog Sec. 2.9).

    ``per_token``: ``[batch, length, ...]`` arrays (or None) flipped along the length for the reversed scan;
    ``one_direction`` returns ``[batch, length, ...]``. The diagonal term is counted in both directions, as the
    official bidirectional HGRN2 module sums a forward and a reversed scan.
    """
    def flip(x):
        return None if x is None else jnp.flip(x, axis=1)

    forward = one_direction(*per_token, segment_ids=segment_ids, keep=keep)
    reverse = one_direction(*map(flip, per_token), segment_ids=flip(segment_ids), keep=flip(keep))
    return forward + flip(reverse)


def heads_flat(*xs):
    """``[batch, length, heads * dim]`` concatenation of ``[batch, length, heads, dim]`` arrays (float32): the
    auxiliary features from which a method computes what the papers derive from the hidden state (Sec. 2.7)."""
    return jnp.concatenate([x.reshape(*x.shape[:2], -1).astype(jnp.float32) for x in xs], axis=-1)


def rms_norm(x, weight=None, eps: float = 1e-6):
    """RMSNorm over the last axis in float32, times ``weight`` when given."""
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight.astype(jnp.float32)


def masked_exp(log_gap, allowed):
    """``exp(log_gap)`` where ``allowed``, else 0, with the exponent masked before ``exp`` (Sec. 2.4), so neither the
    value nor the gradient of a discarded entry can be inf or NaN."""
    return jnp.exp(jnp.where(allowed, log_gap, -jnp.inf))


# ---- decoding (``effjax.attention.decoding``): what the seven methods share --------------------------------------

STATE_AXES = ("batch", "heads", None, None)
HISTORY_AXES = ("batch", None, None, "heads", "head_dim")


def init_cache(batch: int, heads: int, head_dim: int, dtype, *, history: int = 0) -> dict:
    """A recurrent method's empty decoding cache (boxed leaves), whose size does not depend on the sequence length:
    ``state [batch, heads, head_dim, head_dim]`` float32 (d_k = d_v = head_dim) and, for ``history > 0``,
    ``history [batch, history, 3, heads, head_dim]`` in ``dtype``: the method's three raw inputs (q, k, v, in the
    order the method stacks them) of the last ``history`` tokens, which its short convolutions or token shift read
    before the next token."""
    cache = {"state": decoding.boxed_zeros((batch, heads, head_dim, head_dim), jnp.float32, STATE_AXES)}
    if history > 0:
        cache["history"] = decoding.boxed_zeros((batch, history, 3, heads, head_dim), dtype, HISTORY_AXES)
    return cache


def decode(method: str, attend, q, k, v, params, cache: dict, *, mask=None, positions=None, causal=True,
           segment_ids=None, form="chunked", streams=None, **call):
    """One decoding call of a recurrent method (the interface of ``effjax.attention.decoding``): ``(out, cache)``.

    ``attend(q, k, v, params, *, mask, causal, segment_ids, form, initial_state, return_state=True, **call)`` is the
    method's own function, returning ``(out, final_state)``:
      * prefill (``positions`` None): the ordinary causal pass in ``form`` (the module's, chunked by default) from
        the zero state over the right-padded prompts. Padded tokens leave the state unchanged, so the final state
        is each sequence's after its last real token;
      * step (one token per sequence): the recurrent form from the cached state, with ``history=`` the cached
        history when the cache holds one (the method's convolutions read it through ``conv_after``);
      * extend (a right-padded chunk, ``decoding.is_extend``): the same from the cached state in ``form``, the
        chunk's pads leaving the state unchanged.
    ``streams [batch, length, 3, heads, head_dim]``: the raw inputs the convolutions read (needed when the cache
    has a history); the new history is the last real ones of the cached history followed by these.
    """
    decoding.check_call(method, q, causal=causal, segment_ids=segment_ids, positions=positions)
    batch, _, heads, head_dim = q.shape
    state_shape = (batch, heads, head_dim, head_dim)
    if tuple(cache["state"].shape) != state_shape or cache["state"].dtype != jnp.float32:
        raise ValueError(f"{method}: the cache's state must be float32 of shape [batch, heads, head_dim, head_dim] = "
                         f"{state_shape} (init_cache for these inputs), got {cache['state'].dtype} "
                         f"{tuple(cache['state'].shape)}.")
    history = cache.get("history")
    if history is not None and (history.shape[0], *history.shape[2:]) != (batch, 3, heads, head_dim):
        raise ValueError(f"{method}: the cache's history must have shape [batch, count, 3, heads, head_dim] with "
                         f"{(batch, 3, heads, head_dim)} (init_cache for these inputs), got {tuple(history.shape)}.")
    call.update(causal=causal, segment_ids=segment_ids, return_state=True)
    if positions is None:
        out, state = attend(q, k, v, params, mask=mask, form=form, **call)
        cache = {"state": state}
        if history is not None:
            cache["history"] = decoding.conv_history(streams, mask, history.shape[1]).astype(history.dtype)
        return out, cache
    with_history = {} if history is None else {"history": history}
    extend = decoding.is_extend(q, mask, positions)
    out, state = attend(q, k, v, params, mask=mask, form=form if extend else "recurrent",
                        initial_state=cache["state"], **with_history, **call)
    cache = {"state": state}
    if history is not None:
        cache["history"] = decoding.history_after(history, streams, mask)
    return out, cache


def conv_after(history, x, conv):
    """``conv`` (a causal convolution along axis 1 of at most ``count + 1`` taps, e.g. a short conv or a token
    shift) of ``x``, reading ``history [batch, count, ...]`` (the inputs before ``x``, oldest first) where its taps
    reach before ``x``: a decoding step or extend. ``history`` None: ``conv(x)``, zeros before ``x``."""
    return conv(x) if history is None else decoding.conv_step(history, x, conv)[0]

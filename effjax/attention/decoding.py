"""Cached decoding: the interface every decoding method follows, and the key/value cache they share.

A method that declares ``Capabilities(decode=True)`` gives its linen ``Attention``:
  * ``init_cache(batch, max_length, heads, head_dim, dtype)``: the empty cache, a pytree of fixed shapes whose
    leaves are ``nn.LogicallyPartitioned`` (logical axes as the activations', so it shards like them; unbox it
    with ``nn.meta.unbox``). ``max_length`` is the most tokens a sequence will hold (prompt plus new tokens);
    recurrent methods ignore it (their state does not grow), sliding windows keep ``window + 1`` slots.
  * ``__call__(q, k, v, *, causal=True, mask=..., cache=cache)``, **prefill**: q, k, v ``[batch, P]`` are the
    prompts, right-padded (``mask [batch, P]`` True on real tokens; None: all real), the cache is empty; returns
    ``(out [batch, P], cache)``, the outputs of the method's ordinary causal forward and the cache after each
    sequence's last real token.
  * ``__call__(q, k, v, *, causal=True, cache=cache, positions=positions)``, **step**: one token per sequence,
    q, k, v ``[batch, 1]``; ``positions [batch]`` int32 is each token's index in its sequence (the prompt's
    length for the first step); returns ``(out [batch, 1], cache)``.
  * the same with q, k, v ``[batch, C]`` and ``mask [batch, C]``, **extend** (a chunked prefill; only methods that
    declare ``Capabilities(extend=True)``): C more tokens per sequence, right-padded, continuing the cache from
    ``positions`` (each row's first new token's index); returns ``(out [batch, C], cache)``, the cache after each
    row's last real token (a row with none keeps its cache). A long prompt prefilled C tokens at a time then
    holds C x cache attention logits at once instead of P x P, and a conversation continues a cache it kept.
Prefill followed by steps, or by extends, gives the outputs of the teacher-forced forward pass at every position
(``tests/test_decoding.py`` and the conformance sweep check it for every method that declares decode or extend).

The key/value cache (``kv_*``): keys and values in slots, with each slot's position in its sequence (-1: empty).
Position ``p`` lives in slot ``p % slots``: with ``slots = max_length`` that is a plain cache, with fewer slots a
ring buffer (a sliding window keeps ``window + 1``), and one mechanism serves both.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

KV_AXES = ("batch", "length", "heads", "head_dim")


def boxed_zeros(shape, dtype, axes):
    """Zeros of ``shape`` carrying logical ``axes`` (``nn.LogicallyPartitioned``), as every cache leaf does."""
    return nn.LogicallyPartitioned(jnp.zeros(shape, dtype), tuple(axes))


def boxed_full(shape, value, dtype, axes):
    return nn.LogicallyPartitioned(jnp.full(shape, value, dtype), tuple(axes))


def cache_bytes(cache) -> int:
    """Bytes of every array in ``cache`` (boxed or not, concrete or abstract): what decoding keeps in memory."""
    leaves = jax.tree.leaves(nn.meta.unbox(cache))
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves)


def check_length_fixed_at_init(method: str, module, path: tuple, initialised, slots: int, param: str) -> None:
    """ValueError naming the fix when a method whose params are sized by the length it was initialised at
    (``max_length=None``) is asked to decode a cache of another length. ``path``: the param inside ``module``'s
    params; ``initialised(shape)``: the length that shape was made for. Nothing to check during ``init``."""
    tree = module.variables.get("params", {}) if module.scope is not None else {}
    for key in path:
        tree = tree.get(key, {}) if hasattr(tree, "get") else {}
    if not hasattr(tree, "shape"):
        return
    length = initialised(tuple(tree.shape))
    if length != slots:
        raise ValueError(f"{method}: with max_length=None its {param} fit the length {length} it was initialised "
                         f"at, so it decodes only a cache of exactly {length} tokens (got {slots}): use "
                         f"cache_length={length} (generate's default when the model's max_length is {length}), or "
                         f"train with attention_params.{method}.max_length set.")


def check_call(method: str, q, *, causal, segment_ids, positions) -> None:
    """ValueError naming ``method`` for a decoding call outside the interface (see the module docstring)."""
    if not causal:
        raise ValueError(f"{method}: decoding (a cache argument) runs the causal method: call it with causal=True.")
    if segment_ids is not None:
        raise ValueError(f"{method}: decoding takes no segment_ids: give one sequence per batch row.")
    if positions is None:
        return
    batch = q.shape[0]
    if q.shape[1] != 1 and not extends(method):
        from effjax.attention import supporting

        raise ValueError(f"{method}: a decoding step takes one token per sequence (q [batch, 1, heads, head_dim]), "
                         f"got q_len {q.shape[1]}; run the prompt as a prefill (positions=None): continuing a "
                         f"cache by several tokens is for {', '.join(supporting('extend'))}.")
    if tuple(positions.shape) != (batch,):
        raise ValueError(f"{method}: positions must have shape [batch] = ({batch},) (each token's index in its "
                         f"sequence), got {tuple(positions.shape)}.")


def extends(method: str) -> bool:
    """Whether ``method`` continues a cache by several tokens in one call (``Capabilities.extend``)."""
    from effjax.attention import capabilities

    return capabilities(method).extend


def is_extend(q, mask, positions) -> bool:
    """A call continuing a cache by a chunk (several tokens, or one that may be padding), not a one-token step."""
    return positions is not None and (q.shape[1] > 1 or mask is not None)


def token_positions(positions, length: int):
    """int32 ``[batch, length]``: the positions of a decoding call's tokens, ``positions [batch]`` (each row's
    first) onwards."""
    return jnp.asarray(positions, jnp.int32)[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def real_tokens(mask, batch: int, length: int):
    """bool ``[batch, length]``: a chunk's real tokens (``mask`` None: all real)."""
    return jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask, bool)


def select_rows(take_new, new, old):
    """The cache ``new`` where ``take_new [batch]`` is True, else ``old``, row by row (every leaf is batch-major)."""
    return jax.tree.map(lambda n, o: jnp.where(take_new.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def stepped(step, q, k, v, cache, positions, mask):
    """A step, or an extend run as steps: ``step(q, k, v, cache, positions) -> (out, cache)`` is the method's
    one-token step (one token per row, a pure function of arrays), scanned over the chunk's tokens; a pad keeps
    each row's cache as it was (every cache leaf is batch-major). Exact wherever the step is, and sequential in the
    chunk: for methods whose cache has no chunk-parallel form. Returns ``(out [batch, C], cache)``."""
    if not is_extend(q, mask, positions):
        return step(q, k, v, cache, positions)
    batch, length = q.shape[:2]
    real = real_tokens(mask, batch, length)

    def one(cache, inputs):
        t, q_t, k_t, v_t, real_t = inputs
        out, new = step(q_t[:, None], k_t[:, None], v_t[:, None], cache, positions + t)
        return select_rows(real_t, new, cache), out[:, 0]

    per_token = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, real))
    cache, out = jax.lax.scan(one, cache, (jnp.arange(length, dtype=jnp.int32), *per_token))
    return jnp.moveaxis(out, 0, 1), cache


def prompt_lengths(mask, batch: int, length: int):
    """int32 ``[batch]`` real tokens per right-padded prompt (``mask`` None: all ``length``)."""
    if mask is None:
        return jnp.full((batch,), length, jnp.int32)
    return jnp.sum(jnp.asarray(mask).astype(jnp.int32), axis=1)


def last_tokens(x, lengths, count: int):
    """The last ``count`` real entries before each sequence's length, ``[batch, count, ...]``, oldest first,
    zeros where a sequence has fewer (a short convolution's or a token shift's cache after a prefill)."""
    index = lengths[:, None] - count + jnp.arange(count)[None, :]
    taken = jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1).reshape(index.shape + (1,) * (x.ndim - 2)),
                                axis=1)
    return jnp.where((index >= 0).reshape(index.shape + (1,) * (x.ndim - 2)), taken, jnp.zeros((), x.dtype))


# ---- the key/value cache -------------------------------------------------------------------------------------


def kv_init(batch: int, slots: int, heads: int, head_dim: int, dtype) -> dict:
    """An empty key/value cache of ``slots`` slots (boxed leaves)."""
    if slots < 1:
        raise ValueError(f"A key/value cache needs at least one slot, got {slots} (max_length or window too small).")
    return {"key": boxed_zeros((batch, slots, heads, head_dim), dtype, KV_AXES),
            "value": boxed_zeros((batch, slots, heads, head_dim), dtype, KV_AXES),
            "position": boxed_full((batch, slots), -1, jnp.int32, ("batch", "length"))}


def kv_prefill(method: str, cache: dict, k, v, mask) -> dict:
    """``cache`` (empty) holding each right-padded prompt's keys and values: the last ``slots`` real ones."""
    batch, length = k.shape[:2]
    slots = cache["key"].shape[1]
    if cache["key"].shape[0] != batch or cache["key"].shape[2:] != k.shape[2:]:
        raise ValueError(f"{method}: the cache was made for keys [batch, slots, heads, head_dim] = "
                         f"{tuple(cache['key'].shape)}, got keys {tuple(k.shape)}.")
    lengths = prompt_lengths(mask, batch, length)
    slot = jnp.arange(slots)[None, :]
    # The position held by each slot: the latest real position p < length with p % slots == slot.
    position = slot + slots * ((lengths[:, None] - 1 - slot) // slots)
    position = jnp.where(position >= 0, position, -1)
    taken = jnp.clip(position, 0, length - 1)[:, :, None, None]
    held = (position >= 0)[:, :, None, None]

    def gather(x, into):
        return jnp.where(held, jnp.take_along_axis(x, taken, axis=1).astype(into.dtype), jnp.zeros((), into.dtype))

    return {"key": gather(k, cache["key"]), "value": gather(v, cache["value"]), "position": position}


def kv_step(cache: dict, k, v, positions) -> dict:
    """``cache`` with the new token's key and value (``[batch, 1, heads, head_dim]``) at position ``positions``."""
    slot = positions % cache["key"].shape[1]

    def put(into, x):  # one row's slot, written in place (not a pass over the whole cache)
        return jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice_in_dim(row, new, at, axis=0))(
            into, x.astype(into.dtype), slot)

    return {"key": put(cache["key"], k), "value": put(cache["value"], v),
            "position": put(cache["position"], positions[:, None].astype(cache["position"].dtype))}


def kv_allowed(cache: dict, positions, window=None):
    """Bool ``[batch, slots]``: the cached keys the query at ``positions`` sees (itself and earlier, and only the
    ``window`` before it when given)."""
    held = cache["position"]
    allowed = (held >= 0) & (held <= positions[:, None])
    if window is not None:
        allowed &= held >= positions[:, None] - window
    return allowed


def kv_decode(method: str, q, k, v, cache: dict, positions, mask, *, forward, window=None):
    """One decoding call (prefill or step) of a softmax-family method over a key/value cache.

    Prefill: ``forward()`` (the method's own causal pass over the prompts) and the filled cache. Step: the new
    key and value go in, then the query attends to the cached keys ``kv_allowed`` lets it see (``kv_attend``).
    Extend: ``kv_extend``. Returns ``(out, cache)``.
    """
    if positions is None:
        slots = cache["key"].shape[1]
        if window is None and k.shape[1] > slots:
            raise ValueError(f"{method}: a prompt of {k.shape[1]} tokens is longer than the cache ({slots} slots, its "
                             f"max_length): make the cache for at least the prompt plus the new tokens.")
        return forward(), kv_prefill(method, cache, k, v, mask)
    if is_extend(q, mask, positions):
        return kv_extend(q, k, v, cache, positions, mask, window)
    cache = kv_step(cache, k, v, positions)
    return kv_attend(q, cache, kv_allowed(cache, positions, window)), cache


def kv_extend(q, k, v, cache: dict, positions, mask, window=None):
    """An extend over a key/value cache: the chunk's queries attend to the cached keys before ``positions`` and
    causally to the chunk's own real keys (each within ``window`` keys before it when given), then the chunk's
    last ``slots`` real keys and values go into their slots. Attending before writing keeps a ring correct when
    the chunk is longer than the ring (its early keys are still seen by its later queries); the cache is read by
    blocks up to its furthest filled slot, as a step reads it (``kv_attend``). Returns ``(out, cache)``."""
    batch, length = q.shape[:2]
    slots = cache["key"].shape[1]
    real = real_tokens(mask, batch, length)
    index = token_positions(positions, length)
    held = cache["position"]
    sees_cache = jnp.broadcast_to(((held >= 0) & (held < positions[:, None]))[:, None, :], (batch, length, slots))
    sees_chunk = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :]
    if window is not None:  # a number, or one per query [batch, C] (block_local's distance to its block start)
        lowest = (index - window)[:, :, None]
        sees_cache &= held[:, None, :] >= lowest
        sees_chunk &= index[:, None, :] >= lowest
    return kv_attend(q, cache, sees_cache, own=(k, v, sees_chunk)), kv_write(cache, k, v, positions, real)


def kv_write(cache: dict, k, v, positions, real) -> dict:
    """``cache`` with a chunk's real keys and values (``real [batch, C]``, a prefix of each row's chunk, which
    starts at ``positions``) in their slots: the last ``slots`` of them, the ones a ring still holds after it."""
    slots = cache["key"].shape[1]
    index = token_positions(positions, real.shape[1])
    end = positions + jnp.sum(real, axis=1, dtype=jnp.int32)  # one past each row's last real token
    written = real & (index >= (end - slots)[:, None])
    slot = jnp.where(written, index % slots, slots)  # slot ``slots`` is out of range: dropped

    def put(into, x):
        return jax.vmap(lambda row, new, at: row.at[at].set(new.astype(row.dtype), mode="drop"))(into, x, slot)

    return {"key": put(cache["key"], k), "value": put(cache["value"], v), "position": put(cache["position"], index)}


KV_BLOCK = 2048  # slots per block of a step's attention over a longer cache


def kv_attend(q, cache: dict, allowed, block: int | None = None, own=None):
    """Softmax attention of ``q [batch, C, heads, head_dim]`` over the cached keys ``allowed [batch, slots]`` (a step,
    C = 1) or ``[batch, C, slots]`` marks, and with ``own = (k, v, sees [batch, C, C])`` over the chunk's own keys
    too (an extend): ``softmax.attend`` over both. While the furthest slot any query sees is short of the cache's
    last block of ``block`` slots (``KV_BLOCK``), only the blocks up to it are read, one at a time with an online
    softmax (Milakov & Gimelshein 2018), then the chunk's own keys, so a call costs the tokens the cache holds, not
    the length it was made for (``generate`` makes it for the model's ``max_length``); after that, one masked pass
    over every slot. Grouped kv heads are read once per group. A query that sees no key at all (a chunk's padding)
    gets the values' mean from the one pass and 0 from the blocks: unspecified, as padding outputs are."""
    from effjax.attention import softmax

    key, value = cache["key"], cache["value"]  # cast per block below: a whole-cache cast would read every slot
    batch, slots, kv_heads, head_dim = key.shape
    length, heads = q.shape[1], q.shape[2]
    allowed = allowed if allowed.ndim == 3 else allowed[:, None, :]
    block = KV_BLOCK if block is None else block

    def one_pass():
        keys, values, pair = key.astype(q.dtype), value.astype(q.dtype), allowed
        if own is not None:
            keys = jnp.concatenate([keys, own[0].astype(q.dtype)], axis=1)
            values = jnp.concatenate([values, own[1].astype(q.dtype)], axis=1)
            pair = jnp.concatenate([allowed, own[2]], axis=2)
        return softmax.attend(q, keys, values, pair_mask=pair[:, None])

    if slots <= block:
        return one_pass()
    group = heads // kv_heads
    scaled = jnp.moveaxis(q.reshape(batch, length, kv_heads, group, head_dim), 1, 3).astype(jnp.float32) / jnp.sqrt(
        jnp.float32(head_dim))  # [batch, kv_heads, group, C, head_dim]
    furthest = jnp.max(jnp.where(allowed, jnp.arange(slots)[None, None, :], 0))
    floor = jnp.finfo(jnp.float32).min

    def absorb(carry, keys, values, sees):
        """The running max logit, softmax denominator and weighted values after ``keys [batch, n, kv_heads, d]``
        (``sees [batch, C, n]``)."""
        top, total, acc = carry
        sees = sees[:, None, None]
        logits = jnp.einsum("bngcd,bknd->bngck", scaled, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        new_top = jnp.maximum(top, jnp.where(sees, logits, floor).max(-1))
        weights = jnp.where(sees, jnp.exp(logits - new_top[..., None]), 0.0)
        rescale = jnp.exp(top - new_top)
        return (new_top, total * rescale + weights.sum(-1), acc * rescale[..., None] + jnp.einsum(
            "bngck,bknd->bngcd", weights, values.astype(q.dtype).astype(jnp.float32)))

    def read_block(b, carry):
        start = b * block  # whole blocks only: the last one is read by the one pass
        return absorb(carry, jax.lax.dynamic_slice_in_dim(key, start, block, axis=1),
                      jax.lax.dynamic_slice_in_dim(value, start, block, axis=1),
                      jax.lax.dynamic_slice_in_dim(allowed, start, block, axis=2))

    def by_blocks():
        shape = (batch, kv_heads, group, length)
        carry = (jnp.full(shape, floor), jnp.zeros(shape), jnp.zeros(shape + (head_dim,)))
        carry = jax.lax.fori_loop(0, furthest // block + 1, read_block, carry)
        if own is not None:
            carry = absorb(carry, *own)
        _, total, acc = carry
        out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [batch, kv_heads, group, C, head_dim]
        return jnp.moveaxis(out, 3, 1).reshape(q.shape).astype(q.dtype)

    return jax.lax.cond(furthest // block + 1 < -(-slots // block), by_blocks, one_pass)


# ---- short causal convolutions and token shifts ----------------------------------------------------------------


def conv_history(x, mask, count: int):
    """After a prefill: the last ``count`` inputs ``[batch, count, ...]`` before each prompt's end (zeros where a
    prompt is shorter): the cache of a causal convolution with ``count + 1`` taps (a token shift: ``count = 1``)."""
    batch, length = x.shape[:2]
    return last_tokens(x, prompt_lengths(mask, batch, length), count)


def history_after(history, x, mask=None):
    """The last ``count`` real inputs after a step or extend: ``history [batch, count, ...]`` (the previous ones,
    oldest first) followed by the real ones of ``x [batch, C, ...]`` (right-padded by ``mask``)."""
    count = history.shape[1]
    window = jnp.concatenate([history, x.astype(history.dtype)], axis=1)
    return last_tokens(window, count + prompt_lengths(mask, *x.shape[:2]), count)


def conv_step(history, x, conv, mask=None):
    """A causal convolution continued over a step's or an extend's inputs ``x [batch, C, ...]``: ``conv`` (e.g.
    ``lambda w: fftconv.short_causal(w, taps, bias)``, at most ``count + 1`` taps) runs over ``[history, x]`` and
    its last C outputs are the call's; returns ``(y [batch, C, ...], history_after(history, x, mask))``."""
    window = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    return conv(window)[:, history.shape[1]:], history_after(history, x, mask)

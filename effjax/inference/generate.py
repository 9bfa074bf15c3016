"""``generate``: continuations of a batch of prompts from a decoder LM, with cached or recurrent decoding.

One jitted function runs the whole generation: a prefill of the right-padded prompts fills every layer's cache
(``effjax.attention.decoding``), then a ``jax.lax.while_loop`` feeds one token per sequence per step at that
sequence's own position, until ``max_new_tokens`` or until every sequence has produced a stop token. Shapes are
fixed (the cache is made for ``cache_length`` tokens), so nothing recompiles per token. Under a ``mesh`` the
params keep their shardings, and the cache and the batch are sharded along the logical ``batch`` axis (heads along
``heads``) like the activations.

Randomness: sequence ``i``'s token ``t`` is drawn with ``fold_in(fold_in(key(seed), i), t)``, so a call is
reproducible and a sequence's draws do not depend on the rest of the batch or on the mesh.

Continuing: ``keep_context=True`` returns the cache with the tokens (``Generated.context``); a later call given
``context=`` feeds each row's last generated token and its new prompt from there (the methods' ``extend``), so a
conversation or a document fed in turns is never prefilled twice. A row that stops early steps on at its last
token's position while the other rows run, which only writes slots the continuation overwrites first; its
fixed-size cache leaves (states, histories, rings) are selected back to their values at its stop. So a continuation
equals generating from the whole text at once with the same ``cache_length`` (a method whose outputs depend on it,
cosFormer's horizon, differs with another).
"""

import collections
import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import decoding
from effjax.inference.context import Context, check_context
from effjax.inference.sampling import Sampling, next_tokens


@dataclasses.dataclass(frozen=True)
class Generated:
    """``tokens [batch, max_new_tokens]`` int32: each sequence's new tokens, its stop token included, then 0;
    ``lengths [batch]``: how many of them are real; ``prompt_lengths [batch]``: the prompts' real lengths;
    ``context``: the cache to continue from (``generate(..., keep_context=True)``), else None."""

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    context: Context | None = None


def prompt_batch(prompts, vocab_size: int, *, first=None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [batch, P] right-padded with 0, lengths [batch])`` from ragged prompts (a list of token lists) or
    a padded ``[batch, P]`` array whose padding (0) may be on the left, the right or both. ``first [batch]``: a
    token put before each prompt (a continued context's pending token); the prompts may then be empty."""
    if isinstance(prompts, np.ndarray | jax.Array):
        array = np.asarray(prompts)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"prompts must be a list of token lists or an int array [batch, length] (0 = padding), "
                             f"got {array.dtype} of shape {array.shape}.")
        rows = [row[row != 0] for row in array]
    else:
        rows = [np.asarray(list(row), np.int64).reshape(-1) for row in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt.")
    for i, row in enumerate(rows):
        if row.size == 0 and first is None:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. a newline).")
        if row.size and (row.min() < 1 or row.max() >= vocab_size):
            raise ValueError(f"prompt {i} has token {int(row.min() if row.min() < 1 else row.max())}, outside the "
                             f"model's tokens 1..{vocab_size - 1} (0 is padding).")
    if first is not None:
        rows = [np.concatenate([[token], row]) for token, row in zip(first, rows, strict=True)]
    lengths = np.array([row.size for row in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :row.size] = row
    return tokens, lengths


def check_lengths(model, longest_prompt: int, max_new_tokens: int, cache_length: int, *,
                  continuing: bool = False) -> None:
    """One-line errors for a generation that does not fit the cache or the model's learned positions. When
    ``continuing`` a context, ``longest_prompt`` counts the whole conversation and the cache cannot grow."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    what = "A conversation" if continuing else "A prompt"
    bigger = ("start a new conversation (no context) with a larger cache_length" if continuing else
              "raise cache_length")
    if longest_prompt > cache_length:
        raise ValueError(f"{what} of {longest_prompt} tokens is longer than the cache ({cache_length} tokens): "
                         f"{bigger} or shorten the prompt.")
    needed = longest_prompt + max_new_tokens - 1  # the last new token is never fed back
    if needed > cache_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} after {what.lower()} of {longest_prompt} tokens needs a "
                         f"cache of {needed} tokens, but cache_length is {cache_length}: lower max_new_tokens or "
                         f"{bigger}.")
    if longest_prompt > model.max_length:
        raise ValueError(f"{what} of {longest_prompt} tokens is longer than the model's maximum length "
                         f"{model.max_length} (config.model.max_length): shorten it.")
    if model.position == "learned" and needed > model.max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} after {what.lower()} of {longest_prompt} tokens runs to "
                         f"position {needed}, past the model's maximum length {model.max_length} (its positions are "
                         f"learned): use max_new_tokens <= {model.max_length - longest_prompt + 1} or a shorter "
                         f"prompt.")


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens=(), seed: int = 0, cache_length: int | None = None, mesh=None,
             rules=(), prefill_chunk: int = 0, keep_context: bool = False, context: Context | None = None
             ) -> Generated:
    """Continues ``prompts`` with ``model`` (a decoder LM: ``effjax.models.decoder_lm``) and ``params`` (its params,
    or its whole variables dict). ``temperature=0`` is greedy; ``top_k``/``top_p`` filter the sampled tokens
    (``effjax.inference.sampling``); a sequence stops after any of ``stop_tokens``. ``cache_length`` (the tokens
    a sequence may hold) defaults to the model's ``max_length``, the length it trained at, so that methods whose
    forward pass depends on the padded length (cosFormer's M, ProbSparse's u, Hyena's implicit filter) decode as they
    trained, and one compiled generation serves every prompt; longer only when the prompt and ``max_new_tokens``
    need it (positions other than learned ones). ``mesh`` and ``rules`` (logical axis rules) run it sharded.
    ``prefill_chunk`` C >= 2 prefills the prompts C tokens at a time, each chunk continuing the cache (the methods'
    ``extend``), so the prefill holds at most C x (cache_length + C) attention logits at once, C x KV_BLOCK while a
    chunk is short of the cache's last block, instead of P x P; 0: all at once.
    ``keep_context`` returns the cache in ``Generated.context``; ``context`` (such a Context, which this call then
    consumes) continues it: each row's new prompt (which may be empty) follows its text so far, and the cache
    keeps its ``cache_length``, which must hold the whole conversation. A turn draws token t with the same keys
    as any call of its seed, so give each turn its own seed for draws independent of the last turn's."""
    sampling = Sampling(temperature, top_k, top_p).check()
    if "cache" not in inspect.signature(type(model).__call__).parameters:
        raise ValueError(f"{type(model).__module__}.{type(model).__name__} cannot decode: generate needs a decoder "
                         "language model (effjax.models.decoder_lm).")
    check_prefill_chunk(model, prefill_chunk)
    continuing = context is not None
    num_prompts = len(prompts)
    rows = num_prompts if mesh is None else _sharded_rows(num_prompts, mesh, rules)
    if continuing:
        check_extends(model, "continuing a context")
        check_context(model, context, num_prompts, rows, cache_length)
        cache_length = context.cache_length
    tokens, lengths, start, chunk = _prompt_arrays(model, prompts, rows, int(prefill_chunk), context)
    reach = int((start + lengths)[:num_prompts].max())  # the furthest position a prompt fills
    if cache_length is None:
        cache_length = max(model.max_length, reach + max_new_tokens - 1)
    check_lengths(model, reach, max_new_tokens, cache_length, continuing=continuing)
    stop = tuple(int(t) for t in stop_tokens)
    variables = params if "params" in params else {"params": params}
    # A row that stops early need keep its cache as it was at its stop only when the cache is kept.
    held = _fixed_size_leaves(model, rows, cache_length) if keep_context and stop else ()
    held = held if any(held) else ()
    run = _compiled(model, sampling, max_new_tokens, stop, mesh, rules, chunk, held)
    with _context(mesh, rules):
        cache = context.cache if continuing else empty_cache(model, rows, cache_length, mesh, rules)
        if mesh is not None:
            from effjax.train.sharding import batch_sharding

            sharding = batch_sharding(mesh, rules)
            tokens, lengths, start = (jax.device_put(x, sharding) for x in (tokens, lengths, start))
        out, count, cache = run(variables, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(start), cache,
                                jax.random.key(seed))
    out, count, lengths = np.asarray(out), np.asarray(count), np.asarray(lengths)
    kept = None
    if keep_context:
        kept = Context(cache=cache, lengths=np.asarray(start) + lengths + count - 1,
                       pending=out[np.arange(rows), count - 1], cache_length=cache_length, batch=num_prompts)
    prompt_lengths = lengths[:num_prompts] - int(continuing)  # the pending token is not the caller's
    return Generated(out[:num_prompts], count[:num_prompts], prompt_lengths, kept)


def _prompt_arrays(model, prompts, rows: int, prefill_chunk: int, context):
    """``(tokens [rows, width], lengths [rows], start [rows], chunk)``: the right-padded prompts (after each row's
    pending token when continuing a ``context``), their real lengths, the position each starts at, and the prefill's
    chunk (0: one call from the empty cache). Rows past the prompts pad the batch to the mesh's shards: one token
    at position 0 every call (their outputs are dropped), so they never fill a continued cache."""
    num_prompts = len(prompts)
    first = None if context is None else context.pending[:num_prompts]
    tokens, lengths = prompt_batch(prompts, model.vocab_size, first=first)
    start = np.zeros(rows, np.int32)
    if context is None:
        chunk = prefill_chunk if prefill_chunk < tokens.shape[1] else 0  # one chunk: the ordinary prefill
    else:  # a continued prompt is extends, each >= 2 tokens wide (one token at a position is a step)
        start[:num_prompts] = context.lengths[:num_prompts]
        chunk = prefill_chunk or max(tokens.shape[1], 2)
    width = -(-tokens.shape[1] // chunk) * chunk if chunk else tokens.shape[1]
    tokens = np.pad(tokens, [(0, rows - num_prompts), (0, width - tokens.shape[1])])
    tokens[num_prompts:, 0] = 1  # the mesh's padding rows: one token each
    lengths = np.pad(lengths, [(0, rows - num_prompts)], constant_values=1)
    return tokens, lengths, start, chunk


def _sharded_rows(batch: int, mesh, rules) -> int:
    """The batch padded to a multiple of the mesh's batch shards."""
    from effjax.train.sharding import batch_shards

    shards = batch_shards(mesh, rules)
    return -(-batch // shards) * shards


_COMPILED = collections.OrderedDict()  # (id(model), settings) -> (model, jitted generation); the last few models
_COMPILED_KEEP = 8


def check_prefill_chunk(model, prefill_chunk) -> None:
    """One-line errors for a ``prefill_chunk`` that is not 0 or an int >= 2, or that a layer's method cannot run."""
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 0 or (
            prefill_chunk == 1):
        raise ValueError(f"prefill_chunk must be 0 (the whole prompt at once) or an int >= 2, got {prefill_chunk!r}.")
    if prefill_chunk:
        check_extends(model, f"prefill_chunk={prefill_chunk}", "use prefill_chunk=0")


def check_extends(model, what: str, fix: str = "use a model whose methods can") -> None:
    """A one-line error unless every layer's method can continue a cache by a chunk of tokens (``extend``)."""
    from effjax import attention

    cannot = sorted({method for method, _ in model.layer_attention() if not attention.capabilities(method).extend})
    if cannot:
        raise ValueError(f"{what} needs every layer's method to continue a cache by chunks, but "
                         f"{', '.join(cannot)} cannot (methods that can: {', '.join(attention.supporting('extend'))})"
                         f": {fix}.")


def _compiled(model, sampling, max_new_tokens: int, stop: tuple, mesh, rules, prefill_chunk: int = 0,
              held: tuple = ()):
    """The jitted generation for ``model`` and these static settings, reused across calls (a notebook sampling again
    with other prompts or seeds of the same shapes compiles nothing). Modules are not hashable, so the cache is keyed
    by identity and holds the model (so its id is not reused); the mesh and the logical axis rules, which the trace
    reads, are part of the key."""
    frozen_rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    key = (id(model), sampling, max_new_tokens, stop, mesh, frozen_rules, prefill_chunk, held)
    if key not in _COMPILED:
        _COMPILED[key] = model, jax.jit(functools.partial(_generate, model, sampling, max_new_tokens, stop,
                                                          prefill_chunk, held),
                                        donate_argnums=(4,))
        while len(_COMPILED) > _COMPILED_KEEP:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return _COMPILED[key][1]


def empty_cache(model, batch: int, cache_length: int, mesh=None, rules=()):
    """The model's empty decoding cache as arrays, sharded by its logical axes under ``mesh``."""
    make = lambda: nn.meta.unbox(model.init_cache(batch, cache_length))
    if mesh is None:
        return jax.jit(make)()
    boxed = jax.eval_shape(lambda: model.init_cache(batch, cache_length))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.jit(make, out_shardings=shardings)()


def _context(mesh, rules):
    if mesh is None:
        return nn.logical_axis_rules(rules)
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def _prefill(model, variables, tokens, lengths, start, cache, chunk: int):
    """``(logits [batch, vocab] at each prompt's last real token, cache)``: one prefill call from the empty cache,
    or (``chunk``) a scan of extends over the prompts' chunks, each row's chunk starting at ``start`` (its tokens
    already in the cache; 0 for the empty cache) plus the chunk's offset."""
    if not chunk:
        logits, cache = model.apply(variables, tokens, cache=cache)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache
    batch, padded = tokens.shape
    chunks = tokens.reshape(batch, padded // chunk, chunk).transpose(1, 0, 2)

    def extend(carry, inputs):
        cache, last = carry
        index, piece = inputs
        offset = index * chunk
        logits, cache = model.apply(variables, piece, cache=cache, positions=start + offset)
        place = lengths - 1 - offset  # the last real token's place in this chunk
        inside = (place >= 0) & (place < chunk)
        here = jnp.take_along_axis(logits, jnp.clip(place, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        return (cache, jnp.where(inside[:, None], here, last)), None

    last = jnp.zeros((batch, model.vocab_size), jnp.float32)
    (cache, last), _ = jax.lax.scan(extend, (cache, last), (jnp.arange(chunks.shape[0]), chunks))
    return last, cache


def _fixed_size_leaves(model, batch: int, cache_length: int) -> tuple:
    """For each cache leaf (flattened), whether its size is fixed (a recurrent state, a convolution history, a ring
    buffer) rather than growing with ``cache_length`` (slots indexed by position). Compared with one slot fewer,
    since some methods cannot make a cache past the length they were built for; a one-slot cache counts as fixed."""
    shapes = lambda n: jax.tree.leaves(jax.eval_shape(lambda: nn.meta.unbox(model.init_cache(batch, n))))
    if cache_length < 2:
        return (True,) * len(shapes(cache_length))
    return tuple(a.shape == b.shape for a, b in zip(shapes(cache_length), shapes(cache_length - 1), strict=True))


def _keep_rows(done, old, new, held: tuple):
    """``new`` with the rows in ``done`` of each ``held`` leaf taken from ``old``."""
    leaves = [decoding.select_rows(done, o, n) if h else n
              for o, n, h in zip(jax.tree.leaves(old), jax.tree.leaves(new), held, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(new), leaves)


def _generate(model, sampling, max_new_tokens, stop, prefill_chunk, held, variables, tokens, lengths, start, cache,
              key):
    """The jitted body of ``generate``: prefill, then ``while_loop`` steps; returns (new tokens, their counts, the
    cache). The cache is returned for ``keep_context`` and so that the donated input is updated in place (donation
    aliases an input to an output of the same shape); without it a chunked prefill would hold a second cache.
    A row that has stopped steps on with padding at its pending token's position (its count of tokens stays), so
    slots indexed by position get only writes that a continuation overwrites before reading them; the fixed-size
    leaves that every step changes (``held``: states, histories, rings; given only when the cache is kept) keep
    the row's values from before its stop (a select over those leaves at every step)."""
    batch = tokens.shape[0]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    stop = jnp.asarray(stop, jnp.int32)

    def pick(logits, t):
        logits = logits.at[:, 0].set(-jnp.inf)  # 0 is padding, never a token to emit (the model masks it as input)
        return next_tokens(logits, jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys), sampling)

    def stopped(token):
        return jnp.isin(token, stop) if stop.size else jnp.zeros(token.shape, bool)

    last, cache = _prefill(model, variables, tokens, lengths, start, cache, prefill_chunk)
    first = pick(last, 0)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    ends = start + lengths  # each row's first position after its prompt

    def running(carry):
        t, _, _, _, done = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        t, out, count, cache, done = carry
        fed = out[:, t - 1]
        logits, new_cache = model.apply(variables, fed[:, None], cache=cache, positions=ends + count - 1)
        token = jnp.where(done, 0, pick(logits[:, 0], t))
        count = count + (~done).astype(jnp.int32)
        cache = _keep_rows(done, cache, new_cache, held) if held else new_cache
        return t + 1, out.at[:, t].set(token), count, cache, done | stopped(token)

    carry = (jnp.int32(1), out, jnp.ones((batch,), jnp.int32), cache, stopped(first))
    _, out, count, cache, _ = jax.lax.while_loop(running, step, carry)
    return out, count, cache

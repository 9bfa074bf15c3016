"""``generate``: continuations of a batch of prompts from a decoder LM, with cached or recurrent decoding.

One jitted function runs the whole generation: a prefill of the right-padded prompts fills every layer's cache
(``effjax.attention.decoding``), then a ``jax.lax.while_loop`` feeds one token per sequence per step at that
sequence's own position, until ``max_new_tokens`` or until every sequence has produced a stop token. Shapes are
fixed (the cache is made for ``cache_length`` tokens), so nothing recompiles per token. Under a ``mesh`` the
params keep their shardings, and the cache and the batch are sharded along the logical ``batch`` axis (heads along
``heads``) like the activations.

Randomness: sequence ``i``'s token ``t`` is drawn with ``fold_in(fold_in(key(seed), i), t)``, so a call is
reproducible and a sequence's draws do not depend on the rest of the batch or on the mesh.
"""

import collections
import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.inference.sampling import Sampling, next_tokens


@dataclasses.dataclass(frozen=True)
class Generated:
    """``tokens [batch, max_new_tokens]`` int32: each sequence's new tokens, its stop token included, then 0;
    ``lengths [batch]``: how many of them are real; ``prompt_lengths [batch]``: the prompts' real lengths."""

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray


def prompt_batch(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [batch, P] right-padded with 0, lengths [batch])`` from ragged prompts (a list of token lists) or
    a padded ``[batch, P]`` array whose padding (0) may be on the left, the right or both."""
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
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. a newline).")
        if row.min() < 1 or row.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token {int(row.min() if row.min() < 1 else row.max())}, outside the "
                             f"model's tokens 1..{vocab_size - 1} (0 is padding).")
    lengths = np.array([row.size for row in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :row.size] = row
    return tokens, lengths


def check_lengths(model, longest_prompt: int, max_new_tokens: int, cache_length: int) -> None:
    """One-line errors for a generation that does not fit the cache or the model's learned positions."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if longest_prompt > cache_length:
        raise ValueError(f"A prompt of {longest_prompt} tokens is longer than the cache ({cache_length} tokens): "
                         f"raise cache_length or shorten the prompt.")
    needed = longest_prompt + max_new_tokens - 1  # the last new token is never fed back
    if needed > cache_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {longest_prompt} tokens needs a cache of "
                         f"{needed} tokens, but cache_length is {cache_length}: raise it or lower max_new_tokens.")
    if longest_prompt > model.max_length:
        raise ValueError(f"A prompt of {longest_prompt} tokens is longer than the model's maximum length "
                         f"{model.max_length} (config.model.max_length): shorten the prompt.")
    if model.position == "learned" and needed > model.max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {longest_prompt} tokens runs to position "
                         f"{needed}, past the model's maximum length {model.max_length} (its positions are learned): "
                         f"use max_new_tokens <= {model.max_length - longest_prompt + 1} or a shorter prompt.")


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens=(), seed: int = 0, cache_length: int | None = None, mesh=None,
             rules=(), prefill_chunk: int = 0) -> Generated:
    """Continues ``prompts`` with ``model`` (a decoder LM: ``effjax.models.decoder_lm``) and ``params`` (its params,
    or its whole variables dict). ``temperature=0`` is greedy; ``top_k``/``top_p`` filter the sampled tokens
    (``effjax.inference.sampling``); a sequence stops after any of ``stop_tokens``. ``cache_length`` (the tokens
    a sequence may hold) defaults to the model's ``max_length``, the length it trained at, so that methods whose
    forward pass depends on the padded length (cosFormer's M, ProbSparse's u, Hyena's implicit filter) decode as they
    trained, and one compiled generation serves every prompt; longer only when the prompt and ``max_new_tokens``
    need it (positions other than learned ones). ``mesh`` and ``rules`` (logical axis rules) run it sharded.
    ``prefill_chunk`` C >= 2 prefills the prompts C tokens at a time, each chunk continuing the cache (the methods'
    ``extend``), so the prefill holds at most C x (cache_length + C) attention logits at once, C x KV_BLOCK while a
    chunk is short of the cache's last block, instead of P x P; 0: all at once."""
    sampling = Sampling(temperature, top_k, top_p).check()
    if "cache" not in inspect.signature(type(model).__call__).parameters:
        raise ValueError(f"{type(model).__module__}.{type(model).__name__} cannot decode: generate needs a decoder "
                         "language model (effjax.models.decoder_lm).")
    check_prefill_chunk(model, prefill_chunk)
    prefill_chunk = int(prefill_chunk)
    tokens, lengths = prompt_batch(prompts, model.vocab_size)
    if prefill_chunk >= tokens.shape[1]:
        prefill_chunk = 0  # one chunk: the ordinary prefill
    if prefill_chunk:
        tokens = np.pad(tokens, [(0, 0), (0, -tokens.shape[1] % prefill_chunk)])
    if cache_length is None:
        cache_length = max(model.max_length, int(lengths.max()) + max_new_tokens - 1)
    check_lengths(model, int(lengths.max()), max_new_tokens, cache_length)
    stop = tuple(int(t) for t in stop_tokens)
    variables = params if "params" in params else {"params": params}
    batch = tokens.shape[0]
    rows = batch
    if mesh is not None:  # pad the batch to a multiple of its shards with one-token prompts, dropped at the end
        from effjax.train.sharding import batch_shards

        shards = batch_shards(mesh, rules)
        rows = -(-batch // shards) * shards
        tokens = np.pad(tokens, [(0, rows - batch), (0, 0)])
        tokens[batch:, 0] = 1
        lengths = np.pad(lengths, [(0, rows - batch)], constant_values=1)
    run = _compiled(model, sampling, max_new_tokens, stop, mesh, rules, prefill_chunk)
    with _context(mesh, rules):
        cache = empty_cache(model, rows, cache_length, mesh, rules)
        if mesh is not None:
            from effjax.train.sharding import batch_sharding

            sharding = batch_sharding(mesh, rules)
            tokens, lengths = (jax.device_put(x, sharding) for x in (tokens, lengths))
        out, count, _ = run(variables, jnp.asarray(tokens), jnp.asarray(lengths), cache, jax.random.key(seed))
    return Generated(np.asarray(out)[:batch], np.asarray(count)[:batch], np.asarray(lengths)[:batch])


_COMPILED = collections.OrderedDict()  # (id(model), settings) -> (model, jitted generation); the last few models
_COMPILED_KEEP = 8


def check_prefill_chunk(model, prefill_chunk) -> None:
    """One-line errors for a ``prefill_chunk`` that is not 0 or an int >= 2, or that a layer's method cannot run."""
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 0 or (
            prefill_chunk == 1):
        raise ValueError(f"prefill_chunk must be 0 (the whole prompt at once) or an int >= 2, got {prefill_chunk!r}.")
    if not prefill_chunk:
        return
    from effjax import attention

    cannot = sorted({method for method, _ in model.layer_attention() if not attention.capabilities(method).extend})
    if cannot:
        raise ValueError(f"prefill_chunk={prefill_chunk} needs every layer's method to continue a cache by chunks, "
                         f"but {', '.join(cannot)} cannot (methods that can: "
                         f"{', '.join(attention.supporting('extend'))}): use prefill_chunk=0.")


def _compiled(model, sampling, max_new_tokens: int, stop: tuple, mesh, rules, prefill_chunk: int = 0):
    """The jitted generation for ``model`` and these static settings, reused across calls (a notebook sampling again
    with other prompts or seeds of the same shapes compiles nothing). Modules are not hashable, so the cache is keyed
    by identity and holds the model (so its id is not reused); the mesh and the logical axis rules, which the trace
    reads, are part of the key."""
    frozen_rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    key = (id(model), sampling, max_new_tokens, stop, mesh, frozen_rules, prefill_chunk)
    if key not in _COMPILED:
        _COMPILED[key] = model, jax.jit(functools.partial(_generate, model, sampling, max_new_tokens, stop,
                                                          prefill_chunk), donate_argnums=(3,))
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


def _prefill(model, variables, tokens, lengths, cache, chunk: int):
    """``(logits [batch, vocab] at each prompt's last real token, cache)``: one prefill call, or (``chunk``) a scan
    of extends over the prompts' chunks from the empty cache, each row's chunk starting at the chunk's offset."""
    if not chunk:
        logits, cache = model.apply(variables, tokens, cache=cache)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache
    batch, padded = tokens.shape
    chunks = tokens.reshape(batch, padded // chunk, chunk).transpose(1, 0, 2)

    def extend(carry, inputs):
        cache, last = carry
        index, piece = inputs
        start = index * chunk
        logits, cache = model.apply(variables, piece, cache=cache, positions=jnp.full((batch,), start, jnp.int32))
        offset = lengths - 1 - start  # the last real token's place in this chunk
        inside = (offset >= 0) & (offset < chunk)
        here = jnp.take_along_axis(logits, jnp.clip(offset, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        return (cache, jnp.where(inside[:, None], here, last)), None

    last = jnp.zeros((batch, model.vocab_size), jnp.float32)
    (cache, last), _ = jax.lax.scan(extend, (cache, last), (jnp.arange(chunks.shape[0]), chunks))
    return last, cache


def _generate(model, sampling, max_new_tokens, stop, prefill_chunk, variables, tokens, lengths, cache, key):
    """The jitted body of ``generate``: prefill, then ``while_loop`` steps; returns (new tokens, their counts, the
    cache). The cache is returned only so that the donated empty one is updated in place (donation aliases an input
    to an output of the same shape); without it a chunked prefill would hold a second cache."""
    batch = tokens.shape[0]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    stop = jnp.asarray(stop, jnp.int32)

    def pick(logits, t):
        logits = logits.at[:, 0].set(-jnp.inf)  # 0 is padding, never a token to emit (the model masks it as input)
        return next_tokens(logits, jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys), sampling)

    def stopped(token):
        return jnp.isin(token, stop) if stop.size else jnp.zeros(token.shape, bool)

    last, cache = _prefill(model, variables, tokens, lengths, cache, prefill_chunk)
    first = pick(last, 0)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def running(carry):
        t, _, _, _, done = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        t, out, count, cache, done = carry
        fed = out[:, t - 1]
        logits, cache = model.apply(variables, fed[:, None], cache=cache, positions=lengths + t - 1)
        token = jnp.where(done, 0, pick(logits[:, 0], t))
        count = count + (~done).astype(jnp.int32)
        return t + 1, out.at[:, t].set(token), count, cache, done | stopped(token)

    carry = (jnp.int32(1), out, jnp.ones((batch,), jnp.int32), cache, stopped(first))
    _, out, count, cache, _ = jax.lax.while_loop(running, step, carry)
    return out, count, cache

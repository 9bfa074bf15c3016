"""``Context``: what one ``generate`` call leaves for the next to continue (a conversation, a long document fed in
turns), and the checks that a context fits the call that continues it."""

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import linen as nn


@dataclasses.dataclass
class Context:
    """Every layer's cache after each row's prompt and new tokens, all but the last new token (``pending``), which
    the continuing call feeds first, followed by its own prompt.

    ``cache``: the decoding cache (rows padded to the mesh's batch shards, as the call ran it); ``lengths [rows]``:
    the tokens each row holds in it, from position 0; ``pending [rows]``: each row's last generated token;
    ``cache_length``: the cache's size in tokens; ``batch``: the caller's rows (the rest are the mesh's padding).

    Continuing a context donates its cache to that call, so a context continues once; ``copy()`` first to branch
    (several continuations of one conversation)."""

    cache: Any
    lengths: np.ndarray
    pending: np.ndarray
    cache_length: int
    batch: int

    def copy(self) -> "Context":
        """A context whose cache is a copy, to continue while keeping this one."""
        return dataclasses.replace(self, cache=jax.tree.map(lambda leaf: leaf.copy(), self.cache),
                                   lengths=self.lengths.copy(), pending=self.pending.copy())

    @property
    def tokens(self) -> np.ndarray:
        """``[batch]``: the tokens each row holds, the pending one included (its position in the text)."""
        return self.lengths[:self.batch] + 1


def check_context(model, context: Context, num_prompts: int, rows: int, cache_length) -> None:
    """One-line errors for a context that is not a ``Context``, was already continued, has another batch, or was
    made by another model or for another cache length."""
    if not isinstance(context, Context):
        raise ValueError(f"context must be the Context of an earlier generate(..., keep_context=True), got "
                         f"{type(context).__name__}.")
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(context.cache)):
        raise ValueError("This context was already continued (its cache was donated to that call): continue "
                         "context.copy() to branch, or the context that call returned.")
    if num_prompts != context.batch:
        raise ValueError(f"The context holds {context.batch} sequences but {num_prompts} prompts were given: give "
                         "one prompt per sequence ([] to continue a sequence with no new prompt).")
    if cache_length is not None and cache_length != context.cache_length:
        raise ValueError(f"cache_length={cache_length} differs from the context's {context.cache_length}: leave "
                         "cache_length unset when continuing a context.")
    if len(context.lengths) != rows:
        raise ValueError(f"The context was made for {len(context.lengths)} rows (its batch padded to its mesh), this "
                         f"call runs {rows}: continue it under the mesh that made it.")
    want = jax.eval_shape(lambda: nn.meta.unbox(model.init_cache(rows, context.cache_length)))
    shapes = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, np.dtype(leaf.dtype)), tree)
    if jax.tree.structure(want) != jax.tree.structure(context.cache) or shapes(want) != shapes(context.cache):
        raise ValueError("The context's cache does not fit this model (another method, width or layer count made "
                         "it): continue a context with the model that made it.")

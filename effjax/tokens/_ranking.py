"""Shared pieces of the training-free token-reduction methods: per-token scores and keeping by priority.

Private (a leading underscore keeps it out of ``effjax.tokens.names()``): the training-free methods and the
learned pruners (through ``_pruning``) import from it.
"""

import jax
import jax.numpy as jnp

from effjax.tokens import state as state_lib


def cls_importance(stats):
    """The CLS token's attention to every token, averaged over heads [batch, n] (float32, no gradient)."""
    return jax.lax.stop_gradient(jnp.mean(stats.cls_attention(), axis=1))


def prefix_flags(n: int, prefix: int):
    """``[n]`` bool: True on the ``prefix`` protected tokens (CLS, distillation) at the start."""
    return jnp.arange(n) < prefix


def top_index(priority, keep: int, prefix: int, mask=None, *, by_position: bool = True):
    """Indices ``[batch, keep]`` of the ``prefix`` tokens and the ``keep - prefix`` others of highest ``priority
    [batch, n]`` (its prefix columns are ignored); padded tokens (``mask`` False) go last. In their original
    order (``by_position``), else prefix first and then by descending priority."""
    n = priority.shape[1]
    priority = jax.lax.stop_gradient(priority.astype(jnp.float32))
    low = jnp.finfo(jnp.float32).min
    priority = jnp.maximum(jnp.nan_to_num(priority, nan=low / 2), low / 2)  # any real token above padding
    if mask is not None:
        priority = jnp.where(mask, priority, low)
    priority = jnp.where(prefix_flags(n, prefix), jnp.inf, priority)
    _, index = jax.lax.top_k(priority, keep)  # ties (the prefix's inf) in index order
    return (jnp.sort(index, axis=-1) if by_position else index).astype(jnp.int32)


def keep_top(x, tokens, priority, keep: int, prefix: int):
    """Pruning: the prefix tokens and the highest-``priority`` others, in their original order."""
    if keep >= x.shape[1]:
        return x, tokens
    return state_lib.gather(x, tokens, top_index(priority, keep, prefix, tokens.mask))


def cosine(a, b):
    """Cosine similarities ``[batch, n_a, n_b]`` of ``a [batch, n_a, c]`` and ``b [batch, n_b, c]`` (float32)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("bic,bjc->bij", a, b)

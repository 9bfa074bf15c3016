"""Linear recurrences ``h_t = a_t * h_{t-1} + b_t`` along the length axis with ``jax.lax.associative_scan``.

Catalog Sec. 23.5 / Sec. 21: the selective SSM (Mamba) runs on it. The pairs ``(a, b)`` compose associatively as
``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``, so all states come out of a parallel prefix scan in O(log L)
depth. ``chunked`` keeps only one chunk of states alive: a ``lax.scan`` over chunks carries the last state,
and each chunk's coefficients and readout are built inside the step.
"""

import jax
import jax.numpy as jnp
from jax import lax

NAME = "scan"


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def linear_recurrence(a, b, *, initial=None):
    """All states ``h [batch, length, ...]`` of ``h_t = a_t h_{t-1} + b_t`` (elementwise), ``h_{-1} = initial``.

    ``a`` broadcasts against ``b``; ``initial`` (``[batch, ...]``, default zeros) is folded into the first
    step as ``b_0 + a_0 * initial``. Float32 inside.
    """
    b = b.astype(jnp.float32)
    a = jnp.broadcast_to(a.astype(jnp.float32), b.shape)
    if initial is not None:
        b = b.at[:, 0].add(a[:, 0] * initial.astype(jnp.float32))
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return h


def chunked(coefficients, readout, inputs, *, chunk_size=None, final=False, initial=None):
    """``readout(h, inputs)`` for the recurrence whose ``(a, b) = coefficients(inputs)``, chunk by chunk.

    ``inputs`` is a pytree of ``[batch, length, ...]`` arrays; ``coefficients(chunk) -> (a, b)`` and
    ``readout(h, chunk) -> y [batch, chunk, ...]`` see ``chunk_size`` positions at a time (all of them when
    ``chunk_size`` is None or covers the length), so the ``[batch, length, ...]`` states never exist at once.
    A length that is not a multiple of the chunk is zero-padded at the end; padded steps get ``a = 1, b = 0``.
    The chunk size changes the result only by float rounding. ``final=True`` returns ``(y, h_last)``, the state
    after the last position as well (``[batch, ...]``; a decoding prefill's). ``initial`` (``[batch, ...]``, default
    zeros) is the state before the first position (a decoding cache continued by a chunk).
    """
    length = jax.tree.leaves(inputs)[0].shape[1]
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if chunk_size is None or chunk_size >= length:
        a, b = coefficients(inputs)
        h = linear_recurrence(a, b, initial=initial)
        return (readout(h, inputs), h[:, -1]) if final else readout(h, inputs)

    num_chunks = -(-length // chunk_size)
    tail = num_chunks * chunk_size - length

    def split(x):  # [batch, length, ...] -> [chunks, batch, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, tail)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    chunks = jax.tree.map(split, inputs)
    real = (jnp.arange(num_chunks * chunk_size) < length).reshape(num_chunks, chunk_size)
    if initial is None:
        _, b_shape = jax.eval_shape(coefficients, jax.tree.map(lambda x: x[0], chunks))
        initial = jnp.zeros((b_shape.shape[0], *b_shape.shape[2:]), jnp.float32)

    def step(h, xs):
        chunk, ok = xs
        a, b = coefficients(chunk)
        ok = ok.reshape((1, chunk_size) + (1,) * (b.ndim - 2))
        a = jnp.where(ok, jnp.broadcast_to(a, b.shape), 1.0)
        b = jnp.where(ok, b, 0.0)
        states = linear_recurrence(a, b, initial=h)
        return states[:, -1], readout(states, chunk)

    h_last, ys = lax.scan(step, initial.astype(jnp.float32), (chunks, real))  # [chunks, batch, chunk, ...]
    ys = jnp.swapaxes(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], num_chunks * chunk_size, *ys.shape[3:])[:, :length]
    return (ys, h_last) if final else ys

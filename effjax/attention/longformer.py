"""Longformer sliding-window + global attention (Beltagy et al. 2020, "Longformer", Sec. 3.1, Fig. 2d)."""

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import decoding, patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "longformer"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=False, dropout=True, pallas=True,
                            decode=True, extend=True,
                            notes="decoding keeps a ring buffer of window + 1 keys/values and the num_global first "
                                  "tokens' keys/values (the module's global tokens): memory bounded by window + "
                                  "num_global, not the context.")


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, window=256, num_global=1, global_mask=None,
           dropout_rate=0.0, dropout_rng=None, impl="xla"):
    """Softmax over keys with ``|i - j| <= window OR global[i] OR global[j]`` (symmetric global attention).

    The global set is the first ``num_global`` positions (a CLS token; clamped to the length) united
    with the optional boolean ``global_mask`` [batch, length] (e.g. question tokens). Global rows reuse
    q, k, v: the paper's separate global projections are not modelled. ``causal`` intersects the
    pattern with the causal mask (keys [i - window, i] plus earlier global tokens; a global query sees
    only its prefix). Self-attention only. ``impl="xla"``: masked O(N^2) softmax, exact, not faster than
    ``softmax``. Other ``impl`` (``kernels.dispatch``, op "window_global"), e.g. "pallas": the flash kernel
    with the same token-level pattern, computing only
    the window band's tiles and the rows/columns of tiles holding a global token (union over the batch;
    a traced ``global_mask`` gives a traced tile layout, visited through tables); dropout with the
    kernel's own draws. The one difference: a query with no allowed key (e.g. padding far from real keys,
    with no global key in its segment) averages the values of the tiles it visits, where the xla path
    averages all values.
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    batch, length = q.shape[:2]
    if k.shape[1] != length:
        raise NotImplementedError(
            f"{NAME}: cross attention (q_len {length} != kv_len {k.shape[1]}) is not supported: "
            "the window and global tokens are positions of one sequence."
        )
    if window < 0 or num_global < 0:
        raise ValueError(f"{NAME}: window and num_global must be >= 0, got {window} and {num_global}.")
    if global_mask is not None and np.shape(global_mask) != (batch, length):
        raise ValueError(
            f"{NAME}: global_mask must have shape [batch, length] = {(batch, length)}, got {np.shape(global_mask)}."
        )

    def xla():
        is_global = patterns.first_tokens(length, num_global)[None]
        if global_mask is not None:
            is_global = is_global | jnp.asarray(global_mask, bool)
        pair = patterns.band(length, length, window)[None] | patterns.global_tokens(is_global)
        return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                              pair_mask=pair[:, None], dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    if impl == "xla":
        return xla()
    # numpy, so the tile layout stays static unless global_mask is traced.
    is_global = np.broadcast_to(np.arange(length) < num_global, (batch, length))
    if global_mask is not None:
        is_global = is_global | global_mask
    call = dict(q=q, k=k, v=v, window=window, global_tokens=is_global, mask=mask, segment_ids=segment_ids,
                causal=causal, **softmax.kernel_dropout(dropout_rate, dropout_rng))
    return dispatch.run("window_global", impl, call, xla=xla, where=NAME)


class Attention(nn.Module):
    """Linen wrapper of ``attend``: one-sided ``window`` 256 (longformer-base-4096), one global CLS token."""

    window: int = 256
    num_global: int = 1
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the flash kernel over the window band and the global rows/columns of tiles

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"window": ring, "global": cache}`` (``effjax.attention.decoding``): a ring buffer of ``window + 1``
        key/value slots (the causal window i - window..i) and the keys/values of the ``num_global`` first tokens
        (both at most ``max_length``; no global cache when ``num_global`` is 0)."""
        if self.window < 0 or self.num_global < 0:
            raise ValueError(f"{NAME}: window and num_global must be >= 0, got {self.window} and {self.num_global}.")
        cache = {"window": decoding.kv_init(batch, min(self.window + 1, max_length), heads, head_dim, dtype)}
        if self.num_global:
            cache["global"] = decoding.kv_init(batch, min(self.num_global, max_length), heads, head_dim, dtype)
        return cache

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        def forward():
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, window=self.window,
                          num_global=self.num_global, impl=self.impl, **dropout_kwargs(self, deterministic))

        if cache is None:
            return forward()
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        if decoding.is_extend(q, mask, positions):
            return extend(q, k, v, cache, positions, mask, window=self.window, num_global=self.num_global)
        return decode(q, k, v, cache, positions, mask, forward=forward, window=self.window,
                      num_global=self.num_global)


def extend(q, k, v, cache, positions, mask, *, window, num_global):
    """An extend (``effjax.attention.decoding``): query i of the chunk sees the ring's cached keys i - window..i
    that are not global, the cached global keys, and the chunk's own real keys j <= i that are within the window
    or global (``decoding.kv_attend`` over the ring and the global cache side by side, then the chunk); then the
    ring keeps the chunk's last window + 1 real tokens and the global cache its global ones."""
    ring, globals_ = cache["window"], cache.get("global")
    batch, length = q.shape[:2]
    real = decoding.real_tokens(mask, batch, length)
    index = decoding.token_positions(positions, length)
    lowest = (index - window)[:, :, None]
    earlier = lambda held: (held >= 0) & (held < positions[:, None])  # noqa: E731
    held = ring["position"][:, None, :]
    sees = [earlier(ring["position"])[:, None, :] & (held >= num_global) & (held >= lowest)]
    sources = [ring]
    if globals_ is not None:
        sees.append(jnp.broadcast_to(earlier(globals_["position"])[:, None, :],
                                     (batch, length, globals_["position"].shape[1])))
        sources.append(globals_)
    both = {name: jnp.concatenate([c[name] for c in sources], axis=1) for name in ("key", "value")}
    sees_chunk = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :] & (
        (index[:, None, :] >= lowest) | (index[:, None, :] < num_global))
    out = decoding.kv_attend(q, both, jnp.concatenate(sees, axis=2), own=(k, v, sees_chunk))
    cache = {"window": decoding.kv_write(ring, k, v, positions, real)}
    if globals_ is not None:
        cache["global"] = decoding.kv_write(globals_, k, v, positions, real & (index < num_global))
    return out, cache


def decode(q, k, v, cache, positions, mask, *, forward, window, num_global):
    """A decoding call (``effjax.attention.decoding``) over the ring of the window and the global tokens' cache.

    The causal pattern is keys i - window..i plus the earlier global tokens (the first ``num_global``; a global
    query's keys are all earlier tokens, hence all global). A global key still inside the window is read from
    the global cache only, so each key counts once.
    """
    ring, globals_ = cache["window"], cache.get("global")
    if positions is None:  # prefill: the forward pass; the ring keeps the last window + 1 real tokens
        out, ring = decoding.kv_decode(NAME, q, k, v, ring, None, mask, forward=forward, window=window)
        if globals_ is not None:
            first = min(num_global, k.shape[1])
            globals_ = decoding.kv_prefill(NAME, globals_, k[:, :first], v[:, :first],
                                           None if mask is None else jnp.asarray(mask)[:, :first])
        return out, {"window": ring} | ({} if globals_ is None else {"global": globals_})
    ring = decoding.kv_step(ring, k, v, positions)
    keys, values = [ring["key"]], [ring["value"]]
    allowed = [decoding.kv_allowed(ring, positions, window) & (ring["position"] >= num_global)]
    if globals_ is not None:
        # only a global token enters the global cache
        globals_ = decoding.select_rows(positions < num_global, decoding.kv_step(globals_, k, v, positions), globals_)
        keys.append(globals_["key"])
        values.append(globals_["value"])
        allowed.append(decoding.kv_allowed(globals_, positions))
    keys, values = (jnp.concatenate(x, axis=1).astype(q.dtype) for x in (keys, values))
    out = softmax.attend(q, keys, values, mask=jnp.concatenate(allowed, axis=1))
    return out, {"window": ring} | ({} if globals_ is None else {"global": globals_})

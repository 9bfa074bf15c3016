"""Vanilla softmax attention (Vaswani et al. 2017, "Attention Is All You Need", Eq. 1)."""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import allowed_pairs, check_qkv, dropout, dropout_kwargs
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=True, dropout=True, pallas=True,
                            decode=True, extend=True, grouped_kv=True, key_bias=True,
                            notes="key_bias runs on the XLA path only (impl='xla'); decoding keeps a key/value "
                                  "cache of max_length slots.")


def kernel_dropout(dropout_rate: float, dropout_rng) -> dict:
    """The Pallas kernels' dropout arguments (rate and a seed drawn from ``dropout_rng``); empty when off.

    The kernels draw their keep mask from a counter-based hash (``kernels/dropout.py``): the same
    distribution as the XLA path's ``jax.random.bernoulli``, different draws.
    """
    if dropout_rate <= 0.0 or dropout_rng is None:
        return {}
    from effjax.kernels.dropout import seed_from_key

    return {"dropout_rate": dropout_rate, "dropout_seed": seed_from_key(dropout_rng)}


def masked_weights(logits, allowed=None, *, dropout_rate=0.0, dropout_rng=None, dropout_keep=None):
    """Float32 softmax over the last axis with disallowed entries at float32's min, then attention dropout.

    A row with no allowed entry comes out uniform rather than NaN. ``dropout_keep``: see ``common.dropout``.
    """
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    return dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_rng, keep=dropout_keep)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, pair_mask=None, dropout_rate=0.0,
           dropout_rng=None, impl="xla", dropout_keep=None, key_bias=None):
    """softmax(q k^T / sqrt(d)) v over [batch, length, heads, head_dim] inputs, in float32 logits.

    ``pair_mask`` (boolean, broadcastable to [batch, heads, q_len, kv_len]) further restricts which
    query/key pairs may attend: sparse patterns (windows, blocks, globals) are softmax with one.
    Queries with no allowed key (fully padded rows) return a uniform average rather than NaN.
    ``impl`` other than "xla" goes through ``kernels.dispatch`` (op "attention"): "pallas" is the flash kernel
    (``kernels.flash_attention``; interpreted on CPU), and a list such as "cudnn,pallas,xla" tries each in turn.
    No kernel takes ``pair_mask`` or ``key_bias`` (such a call runs XLA only if the list has it), and kernels draw
    their dropout mask differently (``kernel_dropout``).
    ``dropout_keep`` (bool [batch, heads, q_len, kv_len]) replaces the dropout draw (kernel references).
    ``key_bias`` [batch, kv_len] is added to every query's logits (ToMe's proportional attention, Eq. 1).
    k and v may have fewer heads than q, a divisor of them (grouped-query attention: query head i reads kv head
    i // (heads / kv_heads)); the kernels get them repeated (``repeat_kv``).
    """
    check_qkv("softmax", q, k, v, grouped=True)
    check_impl("softmax", impl)
    xla = functools.partial(_attend_xla, q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                            pair_mask=pair_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                            dropout_keep=dropout_keep, key_bias=key_bias)
    if impl == "xla":
        return xla()
    refuse = ("key_bias (proportional attention): no kernel takes a logit bias yet" if key_bias is not None else
              "pair_mask: an arbitrary [batch, heads, q, k] mask is no kernel input (key padding, segments, causal "
              "and window only; block layouts go through kernels.block_sparse)" if pair_mask is not None else None)
    k, v = repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2])  # the kernels take one kv head per query head
    call = dict(q=q, k=k, v=v, mask=mask, segment_ids=segment_ids, causal=causal,
                **kernel_dropout(dropout_rate, dropout_rng))
    return dispatch.run("attention", impl, call, xla=xla, where="softmax", refuse=refuse)


def _attend_xla(q, k, v, *, mask, segment_ids, causal, pair_mask, dropout_rate, dropout_rng, dropout_keep,
                key_bias):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped_q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # query head i reads kv head i // group
    logits = jnp.einsum("bqngd,bknd->bngqk", grouped_q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, heads, q_len, k.shape[1])
    logits = logits / jnp.sqrt(jnp.float32(head_dim))
    if key_bias is not None:
        if key_bias.shape != (batch, k.shape[1]):
            raise ValueError(f"softmax: key_bias must have shape [batch, kv_len] = {(batch, k.shape[1])}, got "
                             f"{key_bias.shape}.")
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
    allowed = allowed_pairs(q_len, k.shape[1], batch, mask=mask, segment_ids=segment_ids, causal=causal)
    if pair_mask is not None:
        allowed = pair_mask if allowed is None else allowed & pair_mask
    weights = masked_weights(logits, allowed, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                             dropout_keep=dropout_keep)
    weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, k.shape[1])
    return jnp.einsum("bngqk,bknd->bqngd", weights.astype(v.dtype), v).reshape(q.shape)


def repeat_kv(x, heads: int):
    """``x [batch, length, kv_heads, head_dim]`` with each kv head repeated for the ``heads // kv_heads`` query heads
    of its group (grouped-query attention), for code that takes one kv head per query head."""
    return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; has no parameters of its own. ``impl``: "xla", "pallas" (the flash kernel) or
    any ``kernels.dispatch`` spec."""

    dropout_rate: float = 0.0
    impl: str = "xla"

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The key/value cache of ``max_length`` slots (``effjax.attention.decoding``)."""
        return decoding.kv_init(batch, max_length, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, key_bias=None,
                 cache=None, positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        def forward():
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, impl=self.impl,
                          key_bias=key_bias, **dropout_kwargs(self, deterministic))

        if cache is None:
            return forward()
        decoding.check_call("softmax", q, causal=causal, segment_ids=segment_ids, positions=positions)
        if key_bias is not None:
            raise ValueError("softmax: decoding takes no key_bias (proportional attention reduces tokens, which "
                             "decoding does not).")
        return decoding.kv_decode("softmax", q, k, v, cache, positions, mask, forward=forward)

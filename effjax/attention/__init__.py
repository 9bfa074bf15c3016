"""Attention methods behind one interface, looked up by name.

A method's name is its module's file name. Every method module exports:
  * ``attend(q, k, v, *, mask=None, segment_ids=None, causal=False, ...)`` - the pure function;
  * ``Attention`` - a linen Module whose ``__call__(q, k, v, *, mask=None, segment_ids=None,
    causal=False, deterministic=True)`` maps ``q [batch, q_len, heads, head_dim]`` and
    ``k, v [batch, kv_len, heads, head_dim]`` to ``[batch, q_len, heads, head_dim]``.
``mask`` is a boolean key-padding mask ``[batch, kv_len]``, True where a token is real.
A module may also define ``projections(params)``: the input projections a model makes for it (default
``("query", "key", "value")``; without ``key`` the model passes ``k = q``): ``projections(name, params)``.

Which method (and params) each layer of a model runs is the model's business:
``effjax.models.layer_attention.resolve``.

What each method supports (causal, padding, segments, cross attention, dropout, a Pallas path, decoding) is
its module's ``CAPABILITIES``: ``capabilities(name)``, ``supporting(flag)``.
"""

from effjax.attention._capabilities import Capabilities, capabilities, no_decode_reason, supporting
from effjax.attention.registry import check_name, defaults, make, names, param_type, projections

__all__ = ["Capabilities", "capabilities", "check_name", "defaults", "make", "names", "no_decode_reason", "param_type",
           "projections", "supporting"]

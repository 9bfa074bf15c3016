"""What each attention method supports: the ``CAPABILITIES`` constant of its module.

Every method module declares ``CAPABILITIES = Capabilities(...)``; ``tests/test_attention_conformance.py``
holds each method to it (a declared capability must work, an undeclared one must be refused by an error naming
the method), and checks the table and counts in ``docs/methods.md`` and ``README.md`` against it.
"""

import dataclasses
import importlib

from effjax.attention.registry import check_name, names


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The call options a method's ``Attention`` supports when built with its defaults.

    Flags (True: supported; False: refused with NotImplementedError naming the method, except ``dropout``):
      * ``causal``: ``causal=True``, so no output reads a later token.
      * ``mask``: a key-padding ``mask [batch, kv_len]``; padded keys change no real output.
      * ``segments``: ``segment_ids [batch, length]``; tokens attend within their own segment only.
      * ``cross``: q_len != kv_len (without ``causal`` or ``segment_ids``, which ``notes`` may restrict).
      * ``dropout``: ``dropout_rate`` acts in training (``deterministic=False``). False: the rate is accepted,
        since a model passes one rate to every layer, and ignored (the weights are never materialized, or the
        paper has no dropout there).
      * ``pallas``: ``impl="pallas"`` runs a Pallas kernel (``kernels/``).
      * ``decode``: cached or recurrent decoding, a prefill then one token at a time (``effjax.attention.decoding``:
        ``Attention.init_cache`` and the ``cache``/``positions`` call arguments).
      * ``extend``: a decoding call continues a cache by several tokens (a chunked prefill,
        ``effjax.attention.decoding``: q, k, v ``[batch, C]`` with ``positions`` and a right-padding ``mask``).
      * ``grouped_kv``: k and v with fewer heads than q, a divisor of them (grouped-query attention, Ainslie et al.
        2023, "GQA", Sec. 2; one kv head is multi-query attention, Shazeer 2019): query head ``i`` reads kv head
        ``i // (heads / kv_heads)``. A model with ``num_kv_heads`` gives such a method the kv heads as they are (its
        decoding cache then holds only those) and any other method copies of them, one per query head.
      * ``key_bias``: ``key_bias [batch, kv_len]`` added to every query's logit of that key (token reduction's
        proportional attention, ``log sizes``); the module then takes a ``key_bias`` keyword.
    ``notes``: what the flags do not show, such as refused combinations or options that change a flag.
    """

    causal: bool
    mask: bool
    segments: bool
    cross: bool
    dropout: bool
    pallas: bool
    decode: bool = False
    extend: bool = False
    grouped_kv: bool = False
    key_bias: bool = False
    notes: str = ""


FLAGS = tuple(f.name for f in dataclasses.fields(Capabilities) if f.type is bool)


def capabilities(name: str) -> Capabilities:
    """The ``CAPABILITIES`` that method ``name`` declares; ValueError for an unknown name, TypeError for none."""
    check_name(name)
    declared = getattr(importlib.import_module(f"effjax.attention.{name}"), "CAPABILITIES", None)
    if not isinstance(declared, Capabilities):
        raise TypeError(f"effjax.attention.{name} must declare CAPABILITIES = Capabilities(...), got {declared!r}.")
    return declared


def supporting(flag: str) -> list[str]:
    """Sorted names of the methods that declare ``flag`` (one of ``FLAGS``)."""
    if flag not in FLAGS:
        raise ValueError(f"Unknown capability {flag!r}; known: {', '.join(FLAGS)}.")
    return [name for name in names() if getattr(capabilities(name), flag)]


def no_decode_reason(name: str) -> str:
    """Why method ``name`` does not decode: its module's ``NO_DECODE`` (a causal method whose outputs cannot be
    produced one token at a time says why there), else what its declarations imply."""
    module = importlib.import_module(f"effjax.attention.{name}")
    if getattr(module, "NO_DECODE", None):
        return module.NO_DECODE
    if not capabilities(name).causal:
        return "it is not causal (its outputs read later tokens)"
    return "its cached or recurrent form is not written yet"

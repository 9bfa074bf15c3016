"""Token reduction (pruning, merging, routing) behind one interface, looked up by name.

A method's name is its module's file name. Every method module exports:
  * ``SPEC`` - a ``Spec``: where it sits in a block, which attention statistics it needs, whether it learns;
  * a pure function of the method (e.g. ``tome.merge``);
  * ``Reducer`` - a linen Module whose ``__call__(x, tokens, stats, *, keep, prefix, deterministic)`` maps
    tokens ``x [batch, n, d]`` with their ``TokenState`` (sizes, source map, mask) and the block's
    ``AttentionStats`` to ``keep`` tokens and the new state. Its fields are the method's params.
A model turns reduction on with ``model.tokens`` (``effjax.tokens.plan``); prefix tokens (CLS, distillation)
are never reduced; ``recover`` puts reduced tokens back at the original length.
"""

from effjax.tokens._spec import Spec
from effjax.tokens.registry import check_name, defaults, make, names, param_type, spec
from effjax.tokens.state import TokenState, recover

__all__ = ["Spec", "TokenState", "check_name", "defaults", "make", "names", "param_type", "recover", "spec"]

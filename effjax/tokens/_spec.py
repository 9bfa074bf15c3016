"""What a token-reduction method is: the ``SPEC`` constant of its module.

Every method module of ``effjax.tokens`` declares ``SPEC = Spec(...)``; the model reads it to place the
reduction, to check that the layer's attention can give the statistics the method needs, and the schedule reads
``max_removed`` to cap (or refuse) per-layer counts.
"""

import dataclasses

# Where a reduction sits in a block: ToMe's place between the attention residual and the MLP, or before the
# block (pruning between blocks, as DynamicViT does).
PLACES = ("attention", "block")

# Attention statistics a method may need (``effjax.tokens.stats.AttentionStats`` provides them):
#   keys: the block's keys averaged over heads [batch, n, head_dim];
#   values: the block's values [batch, n, heads, head_dim];
#   probabilities: the softmax attention weights [batch, heads, n, n] (softmax layers only);
#   cls_attention: the first prefix token's row of them [batch, heads, n] (softmax layers only).
STATISTICS = ("keys", "values", "probabilities", "cls_attention")


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a token-reduction method plugs into a model.

    ``place``: one of ``PLACES``. ``needs``: a subset of ``STATISTICS``. ``learned``: the method has parameters
    (its ``Reducer`` creates them). ``min_prefix``/``max_prefix``: the prefix-token counts (CLS, distillation)
    the method can keep. ``cap``: the most tokens one reduction may remove from ``n`` tokens of which ``prefix``
    are protected (ToMe's bipartite matching removes at most half); ``None`` means every non-prefix token.
    ``merges``: the method can give a token a size other than 1 (merging, fusing, many-to-many); a pure pruner
    sets False, so proportional attention (a zero bias for it) is not asked of the attention.
    ``rate_param``: the boolean param that makes the method learn its per-layer rates (its counts then reach
    ``TokenState.count``, so ``model.tokens.flops_target`` can pull them); '' when it has none.
    ``notes``: simplifications and fixed-capacity forms, as written in ``docs/methods.md``.
    """

    place: str = "attention"
    needs: tuple = ()
    learned: bool = False
    min_prefix: int = 0
    max_prefix: int = 2
    cap: object = None
    merges: bool = True
    rate_param: str = ""
    notes: str = ""

    def max_removed(self, n: int, prefix: int) -> int:
        """The most tokens one reduction may remove from ``n`` tokens with ``prefix`` protected ones."""
        return (n - prefix) if self.cap is None else self.cap(n, prefix)

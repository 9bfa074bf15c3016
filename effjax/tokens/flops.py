"""Analytic multiply-accumulates of a ViT under a token schedule: the count ToMe, DiffRate and DynamicViT
report (attention ``4 N C^2 + 2 N^2 C``, MLP ``8 N C^2`` per block, with ``mlp_dim = 4 C``), so published
GFLOPs figures can be checked from their schedules. ``tests/test_tokens_flops.py`` checks it against XLA's cost
analysis of the real model."""


def block_macs(n_attention: int, n_mlp: int, embed: int, mlp_dim: int | None = None) -> int:
    """One block's MACs: the attention (projections and the two N x N products) on ``n_attention`` tokens and
    the MLP on ``n_mlp`` tokens (fewer when the reduction sits between them, as ToMe's does)."""
    mlp_dim = 4 * embed if mlp_dim is None else mlp_dim
    return 4 * n_attention * embed ** 2 + 2 * n_attention ** 2 * embed + 2 * n_mlp * embed * mlp_dim


def patch_and_head_macs(num_tokens: int, embed: int, patch_size: int, channels: int, num_classes: int,
                        heads: int = 1) -> int:
    """The ViT's MACs outside the blocks as DiffRate counts them: the patch embedding on every token (the prefix
    tokens included, as the reference does) and ``heads`` linear heads."""
    return num_tokens * embed * patch_size * patch_size * channels + heads * embed * num_classes


def vit_macs(num_tokens: int, counts, embed: int, *, mlp_dim: int | None = None, place: str = "attention",
             patch_macs: int = 0, head_macs: int = 0) -> int:
    """MACs of the blocks under ``counts`` (tokens left after each layer's reduction, None where none;
    ``effjax.tokens.schedule.counts``), plus ``patch_macs`` and ``head_macs``. ``place``: 'attention'
    (reduction between attention and MLP) or 'block' (before the block)."""
    total, n = patch_macs + head_macs, num_tokens
    for left in counts:
        after = n if left is None else left
        if place == "block":
            total += block_macs(after, after, embed, mlp_dim)
        else:
            total += block_macs(n, after, embed, mlp_dim)
        n = after
    return total

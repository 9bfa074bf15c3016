"""Transformer encoder classifier in the Long Range Arena style (Tay et al. 2021, Sec. 3)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Backbone, Trunk, dense_init, logical

TASK = "classification"  # the data this family trains on: a source with task == TASK


def pool(x, mask, pooling: str, prefix_tokens: int):
    """[batch, embed]: the first (CLS) token, or the mean over real tokens after the prefix."""
    if pooling == "cls":
        return x[:, 0]
    weights = mask.astype(x.dtype)[..., None]
    x = x[:, prefix_tokens:]
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


HEADS = ("linear", "mlp")


def classifier_head(pooled, num_classes: int, head: str = "linear", mlp_dim: int = 0):
    """Logits from the pooled vector: one Dense ('linear'), or LRA's Dense(mlp_dim), ReLU, Dense ('mlp', lra.md §1)."""
    if head == "mlp":
        pooled = nn.relu(nn.Dense(mlp_dim, kernel_init=logical(dense_init, ("embed", "mlp")),
                                  bias_init=logical(nn.initializers.zeros, ("mlp",)), name="head_hidden")(pooled))
    in_axis = "mlp" if head == "mlp" else "embed"
    logits = nn.Dense(num_classes, kernel_init=logical(dense_init, (in_axis, "classes")),
                      bias_init=logical(nn.initializers.zeros, ("classes",)), name="head")(pooled)
    return logits.astype(jnp.float32)


def check_pooling(pooling: str) -> None:
    if pooling not in ("cls", "mean"):
        raise ValueError(f"model.pooling must be 'cls' or 'mean', got {pooling!r}.")


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"model.head must be 'linear' or 'mlp' (LRA's Dense(mlp_dim), ReLU, Dense), got {head!r}.")


class Model(Backbone, kw_only=True):
    """Embeddings, pre-norm encoder blocks, CLS or mean pooling, and a linear (or LRA's one-hidden-layer) head."""

    vocab_size: int
    num_classes: int
    max_length: int = 2000
    pooling: str = "cls"
    head: str = "linear"  # or 'mlp': LRA's classifier head

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, length] int (0 = padding) -> logits [batch, num_classes] float32."""
        check_pooling(self.pooling)
        check_head(self.head)
        mask = tokens != 0
        prefix = int(self.pooling == "cls")
        x, mask = Trunk(**self.backbone_fields(), vocab_size=self.vocab_size, max_length=self.max_length,
                        prefix_tokens=prefix, name="trunk")(tokens, mask=mask, deterministic=deterministic)
        return classifier_head(pool(x, mask[:, prefix:], self.pooling, prefix), self.num_classes, self.head,
                                self.mlp_dim)

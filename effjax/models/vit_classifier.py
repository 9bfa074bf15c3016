"""Vision Transformer classifier (Dosovitskiy et al., ICLR 2021, Eq. 1-4) over pixel-token images.

Inputs are the image sources' pixel tokens ``[batch, height * width]`` (id = pixel + 1, row-major,
grayscale) or float images ``[batch, height, width, channels]``. Patches of ``patch_size`` pixels are
embedded by a strided conv, so the attention sees an ``(height / p) x (width / p)`` grid of tokens: the
grid mixers of the zoo infer it when it is square (pass ``grid`` in their params otherwise).
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.encoder_classifier import check_pooling, classifier_head, pool
from effjax.models.layers import Backbone, dense_init, embed_init, logical
from effjax.tokens.flops import patch_and_head_macs

TASK = "classification"  # the data this family trains on: a source with task == TASK


def pixels_from_tokens(tokens, image_size, channels: int):
    """Pixel tokens [batch, h * w * c] (pixel + 1) -> float images [batch, h, w, c] in [0, 1]."""
    height, width = image_size
    if tokens.shape[1] != height * width * channels:
        raise ValueError(f"vit_classifier: {tokens.shape[1]} pixel tokens do not make a {height}x{width}x"
                         f"{channels} image (config.model.image_size, config.model.channels).")
    return (tokens.reshape(tokens.shape[0], height, width, channels).astype(jnp.float32) - 1.0) / 255.0


class Model(Backbone, kw_only=True):
    """Patch embedding + learned positions, pre-norm blocks, mean ('mean', default) or CLS pooling, head.

    With token reduction (``tokens``) the mean pool weighs each token by its size (the patches it stands for).
    """

    vocab_size: int  # unused: pixels are embedded through the patch conv, not a table
    num_classes: int
    image_size: tuple = (32, 32)
    channels: int = 1
    patch_size: int = 4
    pooling: str = "mean"

    @nn.compact
    def __call__(self, images, *, deterministic=True):
        """images: pixel tokens [batch, h * w * c] or floats [batch, h, w, c] -> logits [batch, num_classes]."""
        check_pooling(self.pooling)
        if images.ndim == 2:
            images = pixels_from_tokens(images, self.image_size, self.channels)
        batch, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"vit_classifier: image {height}x{width} is not divisible by patch_size {p}.")
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=logical(dense_init, (None, None, None, "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)), name="patch_embed")(images)
        x = x.reshape(batch, -1, self.embed_dim)
        prefix = int(self.pooling == "cls")
        pos = self.param("pos_embed", logical(embed_init, ("length", "embed")),
                         (x.shape[1] + prefix, self.embed_dim), jnp.float32)
        if prefix:
            cls = self.param("prefix_embed", logical(embed_init, ("prefix", "embed")), (1, self.embed_dim),
                             jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.embed_dim)), x], axis=1)
        x = (x + pos[None]).astype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        fixed_macs = patch_and_head_macs(x.shape[1], self.embed_dim, p, self.channels, self.num_classes)
        x, _, tokens = self.blocks(x, deterministic=deterministic, prefix_tokens=prefix, with_tokens=True,
                                   fixed_macs=fixed_macs)
        # Mean pooling weighs each token by how many patches it stands for (ToMe's size-weighted average pool).
        weights = jnp.ones((batch, x.shape[1] - prefix)) if tokens is None else tokens.sizes[:, prefix:]
        if tokens is not None and tokens.mask is not None:  # empty slots of fixed-capacity methods
            weights = weights * tokens.mask[:, prefix:]
        return classifier_head(pool(x, weights, self.pooling, prefix), self.num_classes)

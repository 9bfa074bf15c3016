"""ViT (Dosovitskiy et al., ICLR 2021, Eq. 1-4) and DeiT (Touvron et al., ICML 2021, Sec. 4) as timm builds them.

The same network as timm's ``VisionTransformer`` (and ``VisionTransformerDistilled``) with its default
``global_pool='token'``: a strided conv (with bias) embeds ``patch_size`` patches of float RGB images
``[batch, H, W, 3]`` (channels last, normalised as the checkpoint expects: timm's ``pretrained_cfg`` mean/std);
a learned CLS token, and for DeiT a distillation token, go first; a learned position embedding covers them and
the patches; pre-norm blocks with biased Q/K/V/O projections and erf GELU (``Backbone``, ``qkv_bias=True``,
``activation='gelu_exact'``); a final LayerNorm; a linear head on the CLS token. A distilled DeiT's ``head_dist``
reads the distillation token and the model returns the mean of the two heads' logits, as timm does in eval
mode. It returns that mean in training too: the hard-distillation loss on ``head_dist`` alone (DeiT Eq. 3) is
not part of this family. Token reduction (``model.tokens``) runs inside the blocks and never reduces the CLS
and distillation tokens.

``VARIANTS`` maps timm's names to timm's arguments, and ``variant(name, **overrides)`` builds one with timm-style
overrides (``img_size``, ``patch_size``, ``depth``, ``mlp_ratio``...). ``effjax.models.convert.from_timm`` loads
timm and Hugging Face checkpoints into it.

Not supported: timm's ``global_pool='avg'`` (timm then skips the final norm and normalises the pooled
features with ``fc_norm``, while ``Backbone.blocks`` always applies its final norm), stochastic depth
(``drop_path_rate``), LayerScale (DeiT III) and register tokens.
"""

import difflib

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Backbone, dense_init, embed_init, logical
from effjax.models.vit_classifier import pixels_from_tokens
from effjax.tokens.flops import patch_and_head_macs

TASK = "classification"  # the data this family trains on: a source with task == TASK


# timm's model_args for each name (timm/models/vision_transformer.py and deit.py); the rest of a variant is
# BASE: 224 x 224 RGB images, mlp_ratio 4, 1000 classes, biased Q/K/V, no dropout.
BASE = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, num_classes=1000, qkv_bias=True,
            distilled=False, global_pool="token", drop_rate=0.0, attn_drop_rate=0.0)
TINY = dict(embed_dim=192, depth=12, num_heads=3)
SMALL = dict(embed_dim=384, depth=12, num_heads=6)
BASE_SIZE = dict(embed_dim=768, depth=12, num_heads=12)
LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
VARIANTS = {
    "vit_tiny_patch16_224": TINY,
    "vit_small_patch16_224": SMALL,
    "vit_base_patch16_224": BASE_SIZE,
    "vit_large_patch16_224": LARGE,
    "deit_tiny_patch16_224": TINY,
    "deit_small_patch16_224": SMALL,
    "deit_base_patch16_224": BASE_SIZE,
    "deit_tiny_distilled_patch16_224": dict(TINY, distilled=True),
    "deit_small_distilled_patch16_224": dict(SMALL, distilled=True),
    "deit_base_distilled_patch16_224": dict(BASE_SIZE, distilled=True),
}

# timm's keyword -> this family's field, for overrides that only rename.
TIMM_FIELDS = {"in_chans": "channels", "depth": "num_layers", "drop_rate": "dropout_rate",
               "attn_drop_rate": "attention_dropout_rate", "embed_dim": "embed_dim", "num_heads": "num_heads",
               "num_classes": "num_classes", "patch_size": "patch_size", "qkv_bias": "qkv_bias",
               "distilled": "distilled", "global_pool": "global_pool"}


def image_size_of(size) -> tuple[int, int]:
    """timm's ``img_size`` (an int or a pair) as ``(height, width)``."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def check_name(name: str) -> None:
    if name not in VARIANTS:
        close = difflib.get_close_matches(str(name), list(VARIANTS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown ViT variant {name!r}.{hint} Known: {', '.join(VARIANTS)}.")


def fields(name: str, **overrides) -> dict:
    """This family's fields for timm model ``name`` with timm-style ``overrides`` (``img_size``,
    ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``num_classes``,
    ``qkv_bias``, ``drop_rate``, ``attn_drop_rate``, ``distilled``, ``global_pool``); any other field of
    ``Model`` (``dtype``, ``tokens``, ``attention``, ``norm_eps``, ``mlp_dim``...) passes through."""
    check_name(name)
    args = {**BASE, **VARIANTS[name]}
    accepted = set(args) | {f for f in Model.__dataclass_fields__ if f not in ("parent", "name", "vocab_size")}
    unknown = sorted(set(overrides) - accepted - {"drop_path_rate"})
    if unknown:
        raise ValueError(f"{name}: no override(s) {', '.join(unknown)}. Accepted: {', '.join(sorted(accepted))}.")
    if overrides.pop("drop_path_rate", 0.0):
        raise ValueError(f"{name}: drop_path_rate (stochastic depth) is not supported by effjax's Backbone; "
                         "leave it 0.")
    timm_args = {key: overrides.pop(key) for key in list(overrides) if key in args}
    args.update(timm_args)
    out = {TIMM_FIELDS[key]: value for key, value in args.items() if key in TIMM_FIELDS}
    out["image_size"] = image_size_of(args["img_size"])
    out["mlp_dim"] = int(args["embed_dim"] * args["mlp_ratio"])  # timm: hidden_features = int(dim * mlp_ratio)
    out.update(overrides)
    return out


def variant(name: str, **overrides) -> "Model":
    """The ``Model`` of timm name ``name`` (one of ``VARIANTS``), with timm-style ``overrides``."""
    return Model(vocab_size=0, **fields(name, **overrides))


def load(path, name: str, **overrides):
    """``(model, variables)`` from a timm or Hugging Face checkpoint: ``effjax.models.convert.from_timm``."""
    from effjax.models import convert  # convert imports this module

    return convert.from_timm(path, name, **overrides)


def dense(features: int, name: str):
    return nn.Dense(features, kernel_init=logical(dense_init, ("embed", "classes")),
                    bias_init=logical(nn.initializers.zeros, ("classes",)), name=name)


class Model(Backbone, kw_only=True):
    """Patch embedding, CLS (and distillation) token, learned positions, pre-norm blocks, final norm, head(s).

    ``num_classes`` 0 returns the final CLS features (timm's ``num_classes=0``; the mean of CLS and distillation
    features when ``distilled``). ``norm_eps`` is the epsilon of every LayerNorm (1e-6 as timm; 1e-12 for Hugging
    Face checkpoints). Fields default to timm's ``VisionTransformer()``: ViT-B/16
    at 224 x 224 (``vit_base_patch16_224``), qkv biases, erf GELU, no dropout. ``qkv_bias=False`` also drops the
    output projection's bias (Backbone ties them), which timm keeps.
    """

    vocab_size: int = 0  # unused: pixels are embedded through the patch conv, not a table
    num_layers: int = 12
    embed_dim: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    image_size: tuple = (224, 224)
    patch_size: int = 16
    channels: int = 3
    distilled: bool = False
    global_pool: str = "token"
    qkv_bias: bool = True
    activation: str = "gelu_exact"
    dropout_rate: float = 0.0

    @property
    def prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    def num_patches(self) -> int:
        height, width = image_size_of(self.image_size)
        return (height // self.patch_size) * (width // self.patch_size)

    @nn.compact
    def __call__(self, images, *, deterministic=True):
        """images: float RGB ``[batch, H, W, channels]`` (or pixel tokens ``[batch, H * W * channels]``, ids
        pixel + 1 as the image sources give, scaled to [0, 1]) -> logits ``[batch, num_classes]`` float32."""
        if self.global_pool != "token":
            raise ValueError(f"vit: global_pool={self.global_pool!r} is not supported, only 'token' (the CLS "
                             "token): timm's 'avg' skips the final norm and adds fc_norm, which Backbone lacks.")
        height, width = image_size_of(self.image_size)
        if images.ndim == 2:
            if images.shape[1] != height * width * self.channels:
                raise ValueError(f"vit: {images.shape[1]} pixel tokens do not make a {height}x{width}x"
                                 f"{self.channels} image (model.image_size, model.channels).")
            images = pixels_from_tokens(images, (height, width), self.channels)
        if images.ndim != 4 or images.shape[1:] != (height, width, self.channels):
            raise ValueError(f"vit: expected images [batch, {height}, {width}, {self.channels}] (channels last), "
                             f"got {list(images.shape)}; set img_size/in_chans (model.image_size, model.channels)"
                             " to the images' size, or transpose NCHW images with x.transpose(0, 2, 3, 1).")
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"vit: image {height}x{width} is not divisible by patch_size {p}.")
        batch = images.shape[0]
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=logical(dense_init, (None, None, None, "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)), name="patch_embed")(
            images.astype(self.dtype))
        x = x.reshape(batch, -1, self.embed_dim)
        prefix = [self.param("cls_token", logical(embed_init, ("prefix", "embed")), (1, self.embed_dim),
                             jnp.float32)]
        if self.distilled:
            prefix.append(self.param("dist_token", logical(embed_init, ("prefix", "embed")), (1, self.embed_dim),
                                     jnp.float32))
        prefix = jnp.concatenate(prefix, axis=0)
        pos = self.param("pos_embed", logical(embed_init, ("length", "embed")),
                         (x.shape[1] + self.prefix_tokens, self.embed_dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(prefix, (batch, *prefix.shape)).astype(x.dtype), x], axis=1)
        x = (x + pos[None]).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        fixed_macs = patch_and_head_macs(x.shape[1], self.embed_dim, p, self.channels, self.num_classes,
                                         heads=1 + self.distilled)
        x, _ = self.blocks(x, deterministic=deterministic, prefix_tokens=self.prefix_tokens, fixed_macs=fixed_macs)
        if not self.num_classes:
            return (x[:, :self.prefix_tokens].mean(1)).astype(jnp.float32)
        logits = dense(self.num_classes, "head")(x[:, 0])
        if self.distilled:
            logits = (logits + dense(self.num_classes, "head_dist")(x[:, 1])) / 2
        return logits.astype(jnp.float32)

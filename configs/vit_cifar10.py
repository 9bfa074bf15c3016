"""ViT on grayscale CIFAR-10 (LRA Image's data) with 4x4 patches: an 8 x 8 token grid for the grid mixers.

Sizes follow ViT-Lite-7/4 (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact
Transformers": 7 layers, width 256, 4 heads, MLP 512, patch 4), here on grayscale pixels, so their
91.4% (RGB, heavy augmentation) is not the expected figure; no augmentation is applied.
Needs cifar10 prepared for tfds on disk (``tfds build cifar10 --file_format=array_record``):
  python -m effjax.main --config=configs/vit_cifar10.py --workdir=/tmp/vit --config.data.data_dir=DIR \
      --config.model.attention=slab_sla
Args after ':': ``smoke`` a seconds-long run (tests run it under tfds.testing.mock_data).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    c = common.get_base_config()
    c.total_steps = 35_000         # 200 epochs of 175 steps at batch 256
    c.batch_size = 256
    c.eval_batch_size = 256
    c.eval_every = 1750
    c.checkpoint_every = 1750
    c.learning_rate = 5e-4
    c.schedule = "cosine"
    c.warmup_steps = 1750
    c.weight_decay = 0.05
    c.model.name = "vit_classifier"
    c.model.image_size = (32, 32)
    c.model.channels = 1
    c.model.patch_size = 4
    c.model.pooling = "mean"      # no CLS token, so the 64 patch tokens form a square grid
    c.model.num_layers = 7
    c.model.embed_dim = 256
    c.model.num_heads = 4
    c.model.mlp_dim = 512
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    del c.model["max_length"]     # the patch grid fixes the length
    c.data.name = "tfds_cifar10"
    c.data.data_dir = ""
    if args.smoke:
        common.shrink_for_smoke(c)
    return c

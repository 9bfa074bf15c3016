"""LRA Image: sequential grayscale CIFAR-10 (10-way, 1024 pixel tokens), lra.md §3.4 and §4.

Needs cifar10 prepared for tfds on disk (``tfds build cifar10 --file_format=array_record``).
  python -m effjax.main --config=configs/lra_image.py --workdir=/tmp/lra_image --config.data.data_dir=DIR
  expected: about 42% accuracy (LRA Table 1, Transformer: 42.44).
Departures from LRA: tokens are pixel + 1 so no pixel is padding (LRA masked black pixels), and the
attention width is embed_dim / num_heads = 16 per head (LRA's qkv_dim 64 over 8 heads = 8).

Args after ':' (``configs/lra_common.py``): protocol=lra_original|modern, size=full|cpu|smoke, stage=finetune|pretrain.
- lra_original: the repo's Transformer config (1 layer, width 128, 8 heads, mlp 128, dropout 0.3, attention
  dropout 0.2, batch 256, 200 epochs = 35,000 steps, lr 5e-4 with one epoch of warmup and cosine decay, CLS).
- modern: 6 layers of width 256 (8 heads, mlp 512), batch 64, 100 epochs (70,000 steps), AdamW 1e-3, dropout
  0.1, mean pooling, rotary positions (1-D: LRA allows no 2-D information).
"""

from configs import lra_common


def get_config(arg=None):
    args = lra_common.parse_arg(arg)
    c = lra_common.base_config()
    c.total_steps = 35_000         # 200 epochs of 175 steps
    c.batch_size = 256
    c.eval_batch_size = 256
    c.eval_every = 1750
    c.checkpoint_every = 1750
    c.learning_rate = 5e-4
    c.schedule = "cosine"
    c.warmup_steps = 175
    c.weight_decay = 0.0
    c.model.max_length = 1024
    c.model.num_layers = 1
    c.model.embed_dim = 128
    c.model.num_heads = 8
    c.model.mlp_dim = 128
    c.model.dropout_rate = 0.3
    c.model.attention_dropout_rate = 0.2
    c.data.name = "tfds_cifar10"
    c.data.data_dir = ""
    if args.protocol == "modern":
        lra_common.modern(c, total_steps=70_000, batch_size=64, learning_rate=1e-3, warmup_steps=3500)
        c.model.num_layers, c.model.embed_dim, c.model.num_heads, c.model.mlp_dim = 6, 256, 8, 512
        c.model.dropout_rate, c.model.attention_dropout_rate = 0.1, 0.0
        lra_common.every(c)
    if args.size == "cpu":  # 2 small layers, 1,500 steps of 32 images
        c.total_steps, c.batch_size, c.eval_batch_size = 1500, 32, 100
        c.warmup_steps, c.learning_rate = 150, 1e-3
        c.model.num_layers, c.model.embed_dim, c.model.num_heads, c.model.mlp_dim = 2, 64, 4, 128
        c.model.dropout_rate, c.model.attention_dropout_rate = 0.0, 0.0
        c.eval_max_batches = 20
        lra_common.every(c, 3)
    if args.size == "smoke":
        lra_common.smoke(c, length=None)  # images stay 32 x 32 = 1024 tokens
    return lra_common.finish(c, args, mask_rate=0.5)

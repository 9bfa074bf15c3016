"""LRA Image: sequential grayscale CIFAR-10 (10-way, 1024 pixel tokens), LRA repo Transformer config.

Needs cifar10 prepared for tfds on disk (``tfds build cifar10 --file_format=array_record``).
  python -m effjax.main --config=configs/lra_image.py --workdir=/tmp/lra_image --config.data.data_dir=DIR
  expected: about 42% accuracy (LRA Table 1, Transformer: 42.44).
Departures from LRA: tokens are pixel + 1 so no pixel is padding (LRA masked black pixels), and the
attention width is embed_dim / num_heads = 16 per head (LRA's qkv_dim 64 over 8 heads = 8).

Args after ':': ``smoke`` a seconds-long run (tests run it under tfds.testing.mock_data).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    c = common.get_base_config()
    c.total_steps = 35_000         # 200 epochs of 175 steps
    c.batch_size = 256
    c.eval_batch_size = 256
    c.eval_every = 1750
    c.checkpoint_every = 1750
    c.learning_rate = 5e-4
    c.schedule = "cosine"
    c.warmup_steps = 175
    c.weight_decay = 0.0
    c.model.name = "encoder_classifier"
    c.model.max_length = 1024
    c.model.num_layers = 1
    c.model.embed_dim = 128
    c.model.num_heads = 8
    c.model.mlp_dim = 128
    c.model.dropout_rate = 0.3
    c.model.attention_dropout_rate = 0.2
    c.model.pooling = "cls"
    c.data.name = "tfds_cifar10"
    c.data.data_dir = ""
    if args.smoke:
        common.shrink_for_smoke(c)  # images stay 32 x 32 = 1024 tokens
    return c

"""A small ViT with a CLS token on the generated Shapes images (``effjax/data/shapes.py``), offline.

The model the token-reduction benchmark and colab reduce: trained here in minutes on a CPU, then ToMe and the
other methods run on it without retraining; fine-tuning with reduction on starts from its checkpoint
(``--config.init_from=/tmp/vit_shapes --config.model.tokens.method=tome --config.model.tokens.r=4`` with a new
workdir).
  python -m effjax.main --config=configs/vit_shapes.py --workdir=/tmp/vit_shapes
Args after ':': ``smoke`` a seconds-long run.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    c = common.get_base_config()
    c.total_steps = 2_000
    c.batch_size = 64
    c.eval_batch_size = 250
    c.eval_every = 500
    c.checkpoint_every = 500
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.model.name = "vit_classifier"
    c.model.image_size = (32, 32)
    c.model.channels = 3
    c.model.patch_size = 4          # 8 x 8 = 64 patches + CLS
    c.model.pooling = "cls"         # the prefix token that token reduction keeps
    c.model.num_layers = 4
    c.model.embed_dim = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.model.qkv_bias = True
    c.model.activation = "gelu_exact"
    del c.model["max_length"]       # the patch grid fixes the length
    c.data.name = "shapes"
    c.data.num_train = 20_000
    c.data.num_validation = 2_000
    if args.smoke:
        common.shrink_for_smoke(c)
        c.model.tokens.method = "tome"
        c.model.tokens.r = "4"
    return c

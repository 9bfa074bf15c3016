"""LRA ListOps: 10-way classification of nested list operations, 500 to 2000 tokens (lra.md §3.1).

  python -m effjax.main --config=configs/lra_listops.py --workdir=/tmp/listops
  expected: about 36-37% test accuracy (LRA Table 1: 36.37); the majority class is about 17%.
The README's main command, a few minutes on a 2-core CPU (sequences of 50 to 256 tokens):
  python -m effjax.main --config=configs/lra_listops.py:cpu --workdir=/tmp/listops_cpu
  expected: about 33% validation accuracy against a 16% majority-class rate (BENCHMARKS.md).

Args after ':' (``configs/lra_common.py``): protocol=lra_original|modern, size=full|cpu|smoke,
stage=finetune|pretrain; ``cpu`` and ``smoke`` alone are sizes.
- lra_original: the repo's base config (4 layers, width 512, mlp 1024, batch 32, 5,000 steps, lr 0.05 with
  rsqrt decay after 1,000 warmup steps, weight decay 0.1, CLS pooling).
- modern: 6 layers of width 256 (mlp 1024), batch 64, 50,000 steps (33 epochs), AdamW 1e-3 with warmup and
  cosine decay, mean pooling, rotary positions.
"""

from configs import common, lra_common


def get_config(arg=None):
    args = lra_common.parse_arg(arg)
    c = lra_common.base_config()
    lra_common.rsqrt_recipe(c, total_steps=5000, warmup_steps=1000)
    c.model.max_length = 2000
    c.model.num_layers = 4
    c.model.embed_dim = 512
    c.model.num_heads = 8
    c.model.mlp_dim = 1024
    c.data.name = "listops"
    c.data.num_train = 96_000
    c.data.num_validation = 2_000
    c.data.num_test = 2_000
    c.data.max_depth = 10
    c.data.max_args = 10
    c.data.min_length = 500
    c.data.max_length = 2000
    c.data.seed = 0
    c.data.cache_dir = ""         # '' = $EFFJAX_CACHE or ~/.cache/effjax
    if args.protocol == "modern":
        lra_common.modern(c, total_steps=50_000, batch_size=64, learning_rate=1e-3, warmup_steps=5000)
        c.model.num_layers = 6
        c.model.embed_dim = 256
        c.model.mlp_dim = 1024
        lra_common.every(c)

    if args.size == "cpu":
        # Same operators, depth and arity as LRA with sequences of 50 to 256 tokens instead of 500 to
        # 2000, so that a 2-core CPU trains it in about 5 minutes (BENCHMARKS.md has the numbers).
        c.total_steps = 600
        c.batch_size = 32
        c.eval_batch_size = 100
        c.eval_every = 200
        c.checkpoint_every = 200
        c.learning_rate = 1e-3
        c.schedule = "cosine"
        c.warmup_steps = 100
        c.weight_decay = 0.01
        c.model.max_length = 256
        c.model.num_layers = 2
        c.model.embed_dim = 64
        c.model.num_heads = 4
        c.model.mlp_dim = 128
        c.model.dropout_rate = 0.0
        c.model.attention_dropout_rate = 0.0
        c.data.num_train = 20_000
        c.data.num_validation = 1_000
        c.data.num_test = 1_000
        c.data.min_length = 50
        c.data.max_length = 256
    if args.size == "smoke":
        # 6 steps with a checkpoint every 3 (resume tests stop and restart between them); 2 layers, so
        # that per-layer settings (MASFormer layers, Informer distilling between blocks) have a layer pair.
        common.shrink_for_smoke(c, total_steps=6, every=3, num_layers=2)
        c.model.max_length = 64
        c.data.num_train = 64
        c.data.num_validation = 16
        c.data.num_test = 16
        c.data.max_depth = 4
        c.data.min_length = 0
        c.data.max_length = 64
    return lra_common.finish(c, args, mask_rate=0.1)

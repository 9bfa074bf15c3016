"""LRA ListOps: 10-way classification of nested list operations, 500 to 2000 tokens.

Full LRA size (Tay et al. 2021; repo base config: 4 layers, width 512, mlp 1024, batch 32,
5,000 steps, lr 0.05 with rsqrt decay and 1,000 warmup steps, weight decay 0.1):
  python -m effjax.main --config=configs/lra_listops.py --workdir=/tmp/listops
  expected: about 36-37% validation accuracy (LRA Table 1: 36.37); majority class is about 17%.

On a laptop CPU (the README's main command), ListOps with 50 to 256 tokens, about 5 minutes:
  python -m effjax.main --config=configs/lra_listops.py:cpu --workdir=/tmp/listops_cpu
  expected: about 33% validation accuracy against a 16% majority-class rate (BENCHMARKS.md).

Args after ':' (comma separated): ``cpu`` a few-minute run on shorter sequences; ``smoke`` a
seconds-long run for tests.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, cpu=False, smoke=False)
    c = common.get_base_config()
    c.total_steps = 5000
    c.batch_size = 32
    c.eval_every = 500
    c.checkpoint_every = 500
    c.learning_rate = 0.05
    c.schedule = "rsqrt"
    c.warmup_steps = 1000
    c.weight_decay = 0.1
    c.model.name = "encoder_classifier"
    c.model.max_length = 2000
    c.model.num_layers = 4
    c.model.embed_dim = 512
    c.model.num_heads = 8
    c.model.mlp_dim = 1024
    c.model.pooling = "cls"
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

    if args.cpu:
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
    if args.smoke:
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
    return c

"""LRA Text: byte-level IMDb sentiment (binary), LRA repo base config (lra.md section 4).

Needs imdb_reviews prepared for tfds on disk (``tfds build imdb_reviews --file_format=array_record``
on a machine with internet); nothing is downloaded at run time.
  python -m effjax.main --config=configs/lra_text.py --workdir=/tmp/lra_text --config.data.data_dir=DIR
  expected: about 64% accuracy (LRA Table 1, Transformer: 64.27). LRA's validation split is IMDb's
  test split, so picking a checkpoint on it is picking on the test set; report the last checkpoint.

Args after ':': ``smoke`` a seconds-long run (tests run it under tfds.testing.mock_data).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    c = common.get_base_config()
    c.total_steps = 20_000
    c.batch_size = 32
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.learning_rate = 0.05
    c.schedule = "rsqrt"
    c.warmup_steps = 8000
    c.weight_decay = 0.1
    c.model.name = "encoder_classifier"
    c.model.max_length = 1000      # the repo's default; the paper reports the best of 1K-4K
    c.model.num_layers = 4
    c.model.embed_dim = 256
    c.model.num_heads = 4
    c.model.mlp_dim = 1024
    c.model.pooling = "cls"
    c.data.name = "tfds_imdb"
    c.data.max_length = 1000
    c.data.data_dir = ""           # tfds data_dir ('' = tfds default)
    if args.smoke:
        common.shrink_for_smoke(c)
        c.model.max_length = c.data.max_length = 64
    return c

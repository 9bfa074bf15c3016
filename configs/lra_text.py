"""LRA Text: byte-level IMDb sentiment (binary), lra.md §3.2 and §4.

Needs imdb_reviews prepared for tfds on disk (``tfds build imdb_reviews --file_format=array_record``
on a machine with internet); nothing is downloaded at run time.
  python -m effjax.main --config=configs/lra_text.py --workdir=/tmp/lra_text --config.data.data_dir=DIR
  expected: about 64% accuracy (LRA Table 1, Transformer: 64.27). LRA's validation split is IMDb's
  test split, so picking a checkpoint on it is picking on the test set; report the last checkpoint.

Args after ':' (``configs/lra_common.py``): protocol=lra_original|modern, size=full|cpu|smoke, stage=finetune|pretrain.
- lra_original: the repo's base config (4 layers, width 256, 4 heads, mlp 1024, 1,000 bytes (the repo's
  default; the paper reports the best of 1K-4K), batch 32, 20,000 steps, lr 0.05 rsqrt after 8,000 warmup
  steps, weight decay 0.1, CLS pooling).
- modern: the same width at 4,000 bytes (the paper's "4K"), batch 32, 25,000 steps, AdamW 5e-4 with warmup
  and cosine decay, mean pooling, rotary positions.
"""

from configs import lra_common


def get_config(arg=None):
    args = lra_common.parse_arg(arg)
    c = lra_common.base_config()
    lra_common.rsqrt_recipe(c, total_steps=20_000, warmup_steps=8000)
    c.model.max_length = 1000
    c.model.num_layers = 4
    c.model.embed_dim = 256
    c.model.num_heads = 4
    c.model.mlp_dim = 1024
    c.data.name = "tfds_imdb"
    c.data.max_length = 1000
    c.data.data_dir = ""           # tfds data_dir ('' = tfds default)
    if args.protocol == "modern":
        lra_common.modern(c, total_steps=25_000, batch_size=32, learning_rate=5e-4, warmup_steps=2500)
        c.model.max_length = c.data.max_length = 4000
        lra_common.every(c)
    if args.size == "cpu":
        lra_common.bytes_cpu(c)
    if args.size == "smoke":
        lra_common.smoke(c)
    return lra_common.finish(c, args, mask_rate=0.15)

"""Byte-level decoder-only language model on local text (default: the Python standard library sources).

  python -m effjax.main --config=configs/lm_bytes.py --workdir=/tmp/lm_bytes
  python -m effjax.main --config=configs/lm_bytes.py --workdir=/tmp/lm_text --config.data.paths=/path/to/texts
  python -m effjax.main --config=configs/lm_bytes.py:primer --workdir=/tmp/lm_primer

Args after ':': ``smoke`` a seconds-long run for tests; ``primer_ez`` Primer-EZ (So et al. 2021: squared ReLU and
multi-dconv-head attention) instead of the Transformer; ``primer`` full Primer (Primer-EZ plus the shared Q/K
depthwise representation, Primer's norm and the pre/post-norm layout). Args combine: ``:primer,smoke``. The final
line reports validation loss in nats and bits per byte. A searched block trains with
``--config.model.program=DIR/best.json`` (``python -m effjax.search``).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, primer_ez=False, primer=False)
    c = common.get_base_config()
    c.total_steps = 2000
    c.batch_size = 16
    c.eval_batch_size = 32
    c.eval_every = 500
    c.eval_max_batches = 20
    c.checkpoint_every = 500
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 200
    c.weight_decay = 0.01
    c.grad_clip_norm = 1.0
    c.model.name = "decoder_lm"
    c.model.max_length = 256
    c.model.num_layers = 4
    c.model.embed_dim = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 512
    c.model.attention_dropout_rate = 0.0
    c.model.dropout_rate = 0.0
    c.data.name = "bytes_lm"
    c.data.paths = ""              # comma-separated files, dirs or globs; '' = the Python stdlib's .py files
    c.data.max_length = 256
    c.data.max_files = 2000
    c.data.validation_fraction = 0.05
    c.data.test_fraction = 0.05
    c.data.seed = 0
    if args.primer_ez or args.primer:
        c.model.attention = "primer_mdha"
        c.model.activation = "squared_relu"
    if args.primer:
        c.model.attention_params.primer_mdha.share_qk = True  # Q and K from one depthwise-convolved projection
        c.model.norm = "primer"
        c.model.norm_layout = "pre_post"  # the feed-forward's norm on its output, inside the residual branch
    if args.smoke:
        common.shrink_for_smoke(c)
        c.model.max_length = c.data.max_length = 32
        c.data.max_files = 20
    return c

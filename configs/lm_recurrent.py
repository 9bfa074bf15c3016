"""Byte-level decoder LM made of a linear-attention / state-space family, or a hybrid with softmax layers.

  python -m effjax.main --config=configs/lm_recurrent.py:method=gated_deltanet --workdir=/tmp/lm_gdn
  python -m effjax.main --config=configs/lm_recurrent.py:method=gated_deltanet,attention_every=4 --workdir=/tmp/hyb
  python -m effjax.main --config=configs/lm_recurrent.py:method=mamba2,size=cpu --workdir=/tmp/lm_mamba2

The task, data and trainer are ``configs/lm_bytes.py``'s (byte-level LM on local text, the Python standard library
by default; the final line reports bits per byte). Args after ':':
  * ``method``: the family of every layer (``retnet``, ``gla``, ``deltanet``, ``gated_deltanet``, ``mamba2``,
    ``rwkv7``, ``hgrn2``; any registered attention method works).
  * ``attention_every=N``: a hybrid stack, softmax attention in every N-th layer (layers N-1, 2N-1, ...) through
    MASFormer's ``full_attention_layers``; 4 is Qwen3-Next's three Gated DeltaNet layers per attention layer.
  * ``size``: ``full`` (``lm_bytes``' model and 2000 steps), ``cpu`` (the same model, 300 steps: the families side
    by side on a CPU, ``benchmarks/recurrent_lm.py``), ``smoke`` (seconds, for tests).
  * ``form``: the family's form while training (``chunked``; ``parallel`` and ``recurrent`` give the same function).
The LM is causal, so the families run their causal recurrence; no position embedding is needed by them but the
default learned one is kept so that hybrids and the plain Transformer of ``lm_bytes`` compare on equal terms.
"""

from configs import common, lm_bytes

SIZES = ("full", "cpu", "smoke")


def get_config(arg=None):
    args = common.parse_arg(arg, method="gated_deltanet", attention_every=0, size="full", form="chunked")
    if args.size not in SIZES:
        raise ValueError(f"Unknown size {args.size!r} for lm_recurrent; known: {', '.join(SIZES)}.")
    c = lm_bytes.get_config("smoke" if args.size == "smoke" else None)
    c.model.attention = args.method
    table = c.model.attention_params  # every method's defaults (configs.common): --config.model.attention_params...
    if args.method in table and "form" in table[args.method]:
        table[args.method].form = args.form
    elif args.form != "chunked":
        raise ValueError(f"lm_recurrent: method {args.method!r} has no 'form' parameter; drop form={args.form}.")
    if args.attention_every < 0:
        raise ValueError(f"attention_every must be >= 0 (0: no softmax layers), got {args.attention_every}.")
    if args.attention_every:
        if args.size == "smoke":  # one whole period, so the smoke run has a softmax layer too
            c.model.num_layers = args.attention_every
        every = args.attention_every
        c.model.full_attention_layers = tuple(range(every - 1, c.model.num_layers, every))
        c.model.full_attention = "softmax"
    if args.size == "cpu":
        c.total_steps = 300
        c.warmup_steps = 30
        c.eval_every = c.checkpoint_every = 150
    return c

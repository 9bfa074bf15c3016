"""Defaults shared by every task config; task files override only what differs."""

import ml_collections
from ml_collections import config_dict

# Logical axis -> mesh axis rules. Flax skips a mesh axis a tensor already uses, so activations
# [batch, length, embed] shard only the batch while parameters [embed, mlp] shard over fsdp x tensor.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),  # small vocabularies (17, 257) rarely divide a mesh axis
    ("classes", None),
    ("length", None),
    ("head_dim", None),
    ("prefix", None),
)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'a=1,b,c=x' (the part after ':' in --config=file.py:arg) into a ConfigDict.

    A bare word sets a boolean flag; every key must be one of ``defaults``.
    """
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config arg {key!r}; known: {', '.join(sorted(defaults))}.")
        default = defaults[key]
        if not value:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        else:
            parsed[key] = type(default)(value)
    return parsed


def get_base_config() -> ml_collections.ConfigDict:
    """Trainer defaults: every field a task can override, each documented here."""
    c = ml_collections.ConfigDict()
    c.seed = 0                    # seeds init, dropout and data order; a rerun with it is bit-identical
    c.total_steps = 5000          # optimizer steps in the run
    c.batch_size = 32             # global batch, split over processes and the data x fsdp mesh axes
    c.eval_batch_size = 32        # global eval batch; the split is padded to a multiple of it
    c.eval_every = 500            # steps between evaluations on the validation split (0: only at the end)
    c.eval_max_batches = 0        # cap on eval batches per evaluation (0: the whole split)
    c.test_at_end = False         # after the final validation, evaluate the whole test split too (metrics 'test/...';
    #                               LRA reports the last checkpoint's test accuracy)
    c.checkpoint_every = 500      # steps between checkpoints (0: only at the end and on SIGTERM)
    c.keep_checkpoints = 2        # how many recent checkpoints to keep
    c.log_every = 50              # steps between metrics.jsonl / TensorBoard rows
    c.learning_rate = 1e-3        # peak learning rate
    c.schedule = "cosine"         # 'cosine', 'rsqrt' (LRA: lr * min(1, s/w) / sqrt(max(s, w))) or 'constant'
    c.warmup_steps = 100          # linear warmup length
    c.weight_decay = 0.0          # decoupled AdamW decay on every parameter (LRA's flax.optim.Adam semantics)
    c.adam_b1 = 0.9
    c.adam_b2 = 0.98
    c.grad_clip_norm = 0.0        # global-norm clipping threshold (0: off)
    c.trainable = ""              # regex: train only params whose path ('block_1/tokens/prune_logits') matches
    c.init_from = ""              # fine-tune: a workdir (or its checkpoints/<step>) whose matching params start the run
    c.label_smoothing = 0.0       # classification only

    c.model = ml_collections.ConfigDict()
    c.model.name = "encoder_classifier"   # a module of effjax/models: encoder_classifier | decoder_lm
    c.model.max_length = 2000     # longest input the position table covers
    c.model.position = "learned"  # learned | sinusoid (fixed, LRA Pathfinder) | rotary (RoFormer, on q and k) | none
    c.model.num_layers = 4
    c.model.embed_dim = 128
    c.model.num_heads = 4
    c.model.num_kv_heads = 0      # key/value heads (0: num_heads; 1: multi-query; a divisor: grouped-query attention)
    c.model.mlp_dim = 512
    c.model.attention = "softmax"          # a method name, or one per layer: 'performer,softmax' on a command line
    c.model.attention_params = attention_param_defaults()  # --config.model.attention_params.<method>.<param>
    c.model.attention_dropout_rate = 0.1
    c.model.attention_impl = "xla"         # xla | pallas | auto | a backend | a list ("cudnn,pallas,xla"):
    #                                        kernels.dispatch, for every layer whose method has a kernel path
    c.model.dropout_rate = 0.1
    c.model.full_attention_layers = ()     # MASFormer: these layer indices use model.full_attention instead
    c.model.full_attention = "softmax"
    c.model.activation = "gelu"           # gelu | relu | silu | squared_relu (Primer)
    c.model.norm = "layernorm"            # layernorm | primer (Primer's norm) | prepbn (SLAB; not for causal models)
    c.model.norm_layout = "pre"           # pre | pre_post (full Primer: the MLP's norm on its output, in the residual)
    c.model.prepbn_steps = 60_000         # PRepBN: steps over which LN gives way to RepBN
    c.model.prepbn_warmup = 0             # PRepBN: steps of pure LN first
    c.model.distil = False                # Informer distilling between encoder blocks (halves the length)
    c.model.qkv_bias = False              # biases on the attention projections (timm's ViT has them)
    c.model.program = ""                   # a searched block (effjax.search): program JSON or a .json file path
    c.model.tokens = token_defaults()     # token reduction inside the block loop (off unless tokens.method is set)
    c.model.dtype = "float32"             # activation dtype; parameters stay float32

    c.data = ml_collections.ConfigDict()
    c.data.name = "listops"       # a source of effjax.data.names(); other keys are its params

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1              # -1: all devices left over after fsdp and tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.logical_axis_rules = DEFAULT_RULES
    return c


def attention_param_defaults() -> ml_collections.ConfigDict:
    """Every attention method's params at their paper defaults, keyed by method name.

    Listing them all lets any one be set from the command line of a locked config, e.g.
    ``--config.model.attention_params.performer.num_features=128``; a layer uses its own method's entry.
    Params whose default is None are typed placeholders (``grid``: a tuple such as ``'(16, 32)'``). ``impl``
    is a placeholder too: unset, a layer takes ``model.attention_impl`` (the precedence is applied in one
    place, ``effjax.models.layer_attention.resolve``). Setting a param of a method no layer uses logs a warning.
    """
    from effjax import attention

    table = ml_collections.ConfigDict()
    for method in attention.names():
        table[method] = {key: config_dict.placeholder(attention.param_type(method, key))
                         if val is None or key == "impl" else val for key, val in attention.defaults(method).items()}
    return table


def token_defaults() -> ml_collections.ConfigDict:
    """``model.tokens``: token reduction (``effjax.tokens``), resolved in one place, ``effjax.tokens.plan``.

    Strings so that every form can be set from a command line, e.g. ``--config.model.tokens.method=tome
    --config.model.tokens.r='(16,-1)'``; every method's params are listed at their paper defaults under
    ``params.<method>``.
    """
    from effjax import tokens

    t = ml_collections.ConfigDict()
    t.method = ""          # '' (off) or a module of effjax/tokens: tome, dynamicvit, ... (effjax.tokens.names())
    t.r = ""               # tokens removed per layer: '16', ToMe's '(16,-1)' (r, inflection), or '8,8,4' per layer
    t.keep = ""            # or keep ratios per stage: '0.7' (each stage keeps 0.7 of the last), '0.7,0.5'
    t.layers = ""          # the reducing layers, '3,6,9' (default: every layer)
    t.prop_attn = True     # proportional attention: log(token size) added to every key's logit (ToMe Eq. 1)
    t.flops_target = config_dict.placeholder(float)  # GMACs learned rates are pulled to (diffrate learned=True)
    t.flops_weight = 5.0   # the weight of that loss, (GMACs - target)^2 (DiffRate's lambda)
    t.params = ml_collections.ConfigDict()
    for method in tokens.names():
        t.params[method] = {key: config_dict.placeholder(tokens.param_type(method, key)) if val is None else val
                            for key, val in tokens.defaults(method).items()}
    return t


def shrink_for_smoke(c: ml_collections.ConfigDict, *, total_steps: int = 4, every: int = 2,
                     num_layers: int = 1) -> ml_collections.ConfigDict:
    """A seconds-long run of the same task: a tiny model of ``num_layers`` blocks trained ``total_steps``
    steps, evaluated and checkpointed ``every`` steps."""
    c.total_steps = total_steps
    c.batch_size = 8
    c.eval_batch_size = 8
    c.eval_every = every
    c.eval_max_batches = 2
    c.checkpoint_every = every
    c.log_every = 1
    c.learning_rate = 1e-3
    c.schedule = "constant"
    c.warmup_steps = 0
    c.model.num_layers = num_layers
    c.model.embed_dim = 32
    c.model.num_heads = 4
    c.model.mlp_dim = 64
    return c

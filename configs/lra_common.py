"""What the six Long Range Arena task configs share: their config arg, the modern protocol and the pretraining stage.

Every ``configs/lra_<task>.py`` takes ``protocol=lra_original|modern,size=full|cpu|smoke,stage=finetune|pretrain``
after ':' (``--config=configs/lra_text.py:protocol=modern``); the older bare words ``cpu`` and ``smoke`` still mean
``size=cpu`` and ``size=smoke``.

- ``lra_original``: the LRA repository's configs (Tay et al. 2021; the maintainers call the repo configs
  authoritative over the paper's appendix, ``shared/methods/lra.md`` §4): the paper's layers, width, heads, MLP,
  steps, batch, learning rate and schedule, pooling and position encoding.
- ``modern``: AdamW with linear warmup and cosine decay, mean pooling, rotary positions (RoFormer), longer
  training; the recipe family of S4/S5/Mega-era LRA results at Transformer scale (per-task values in each file).
- ``stage=pretrain``: self-pretraining on the task's own training inputs before fine-tuning (Amos, Berant and
  Gupta, "Never Train from Scratch", ICLR 2024): masked-token denoising with the paper's masking rates (10% for
  ListOps, 15% for text, 50% for images). The fine-tune then starts from it with ``--config.init_from=<pretrain
  workdir>``; ``python -m effjax.lra --pretrain`` runs both stages.
- ``size``: ``full`` is the recipe; ``cpu`` a documented reduced run of a few minutes on a 2-core CPU;
  ``smoke`` seconds, for tests.

Every task evaluates the test split after the last step (``test_at_end``): LRA reports the last checkpoint's
test accuracy (lra.md §7.3).
"""

from configs import common

PROTOCOLS = ("lra_original", "modern")
SIZES = ("full", "cpu", "smoke")
STAGES = ("finetune", "pretrain")


def parse_arg(arg: str | None):
    """The task config arg: protocol, size and stage, each checked against its valid values."""
    args = common.parse_arg(arg, protocol="lra_original", size="full", stage="finetune", cpu=False, smoke=False)
    if args.cpu or args.smoke:
        args.size = "smoke" if args.smoke else "cpu"
    for key, valid in (("protocol", PROTOCOLS), ("size", SIZES), ("stage", STAGES)):
        if args[key] not in valid:
            raise ValueError(f"Unknown LRA config {key}={args[key]!r}; valid: {', '.join(valid)}.")
    return args


def base_config():
    """The trainer defaults (LRA's Adam b2 0.98 and decoupled decay) with LRA's head and a final test evaluation."""
    c = common.get_base_config()
    c.model.name = "encoder_classifier"
    c.model.pooling = "cls"
    c.model.head = "mlp"          # LRA's classifier head: Dense(mlp_dim), ReLU, Dense(classes)
    c.test_at_end = True
    return c


def rsqrt_recipe(c, *, total_steps: int, warmup_steps: int):
    """The LRA repo's text-family optimisation (ListOps, Text, Retrieval): batch 32, lr 0.05 with linear warmup
    and rsqrt decay (``constant * linear_warmup * rsqrt_decay``), decoupled weight decay 0.1, 10 evaluations."""
    c.total_steps = total_steps
    c.batch_size = 32
    c.learning_rate = 0.05
    c.schedule = "rsqrt"
    c.warmup_steps = warmup_steps
    c.weight_decay = 0.1
    return every(c)


def modern(c, *, total_steps: int, batch_size: int, learning_rate: float, warmup_steps: int,
           weight_decay: float = 0.05, position: str = "rotary"):
    """The modern protocol's optimisation and model choices (the per-task sizes stay in the task file)."""
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.learning_rate = learning_rate
    c.warmup_steps = warmup_steps
    c.schedule = "cosine"
    c.weight_decay = weight_decay
    c.grad_clip_norm = 1.0
    c.model.pooling = "mean"
    c.model.position = position
    return c


def every(c, evals: int = 10):
    """Evaluate and checkpoint ``evals`` times over the run."""
    c.eval_every = c.checkpoint_every = max(c.total_steps // evals, 1)
    return c


def bytes_cpu(c):
    """The reduced CPU run of the byte-level tasks (Text, Retrieval): 512 bytes, 2 small layers, 1,500 steps of 32."""
    c.total_steps, c.batch_size, c.eval_batch_size = 1500, 32, 100
    c.learning_rate, c.schedule, c.warmup_steps, c.weight_decay = 1e-3, "cosine", 150, 0.01
    c.model.max_length = c.data.max_length = 512
    c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 128
    c.eval_max_batches = 20
    return every(c, 3)


def smoke(c, *, length: int | None = 64):
    """A seconds-long run of the same task (tests): a tiny model, 4 steps, checkpoints every 2."""
    common.shrink_for_smoke(c)
    if length is not None:
        c.model.max_length = c.data.max_length = length
    return c


def finish(c, args, *, mask_rate: float):
    """Applies the stage: ``pretrain`` swaps the classifier for the masked-token pretraining model."""
    if args.stage == "pretrain":
        if "head" in c.model:     # the pretraining model has its own per-token head
            del c.model["head"]
        c.model.name = "encoder_pretrain"
        c.model.objective = "masked"
        c.model.mask_rate = mask_rate
        c.test_at_end = False
    return c

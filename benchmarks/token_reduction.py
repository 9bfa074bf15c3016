"""Token reduction: speed and FLOPs on ViT-B/16 and DeiT-S, and agreement with the unreduced model on Shapes.

  python benchmarks/token_reduction.py                          # CPU: batch 8, every method, both sections
  python benchmarks/token_reduction.py --batch=256,32           # GPU: throughput at batch 256 and 32
  python benchmarks/token_reduction.py --methods=tome,topk --sections=speed
  python benchmarks/token_reduction.py --tiny --train_steps=0   # the test's mode: one rate per method, 16 images

Every registered method (``effjax.tokens.names()``) runs at two comparable reduction rates, picked from its
``Spec``: methods with a per-layer ``cap`` (ToMe-like mergers) take ToMe's ``r`` (r=8 and 16 on the 12-layer
models, 4 and 8 on the 4-layer Shapes ViT); the others (pruners, soft mergers) keep ratios 0.7 and 0.5 per
stage at layers 3,6,9 (Shapes: 1,2,3), DynamicViT's schedule; Token-Shuffle, which folds 2 x 2 windows of the
patch grid, keeps 0.25 once, at layer 6 or 3 (Shapes: 2 or 1). A method whose model cannot be built or traced
(its ``Reducer`` or the plan raises) gets a row with its reason and no numbers. Learned methods (``Spec.learned``)
run with their parameters at initialisation: their speed is real, their agreement is that of an untrained policy.

(a) speed: ViT-B/16 and DeiT-S at 224x224, forward only (jitted, random images, random weights). Time is the
median of ``--repeats`` runs after a discarded warm-up, each run of the reduced model paired with one of the
unreduced model in the same loop (so load on a shared machine hits both alike); the images/s ratio is
unreduced time / reduced time. GFLOPs are XLA's cost analysis of the jitted forward (``flops / 2``, i.e. the
multiply-accumulates the ToMe and DynamicViT papers call FLOPs), per image.

(b) agreement: the trained Shapes ViT (``configs/vit_shapes.py``, 4 layers, 64 patches + CLS) from ``--workdir``
(its newest checkpoint; trained there in-process for ``--train_steps`` steps when it has none). Every method
and rate runs without retraining over the validation split; top-1 agreement with the unreduced model's
predictions, accuracy and its drop, and images/s and GFLOPs ratios at ``--eval_batch``.

Writes ``benchmarks/results/token_reduction.{json,png}`` (``--out``): the rows, and a plot of speed-up against
agreement (one point per method and rate) beside speed-up against GFLOPs ratio on the 12-layer models.
"""

import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

_SECTIONS = flags.DEFINE_list("sections", ["speed", "agreement"], "Which parts to run: speed, agreement.")
_METHODS = flags.DEFINE_list("methods", [], "Token-reduction methods (default: all registered).")
_MODELS = flags.DEFINE_list("models", [], "Speed models of SPEED_MODELS (default vit_b16,deit_s; --tiny: the tiny "
                            "Shapes ViT of the agreement section).")
_BATCH = flags.DEFINE_list("batch", [], "Speed batch sizes, one table each (default 8). GPU: 256,32.")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Timed runs per configuration, the median kept (default 5; --tiny 2).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/vit_shapes", "The trained Shapes ViT (configs/vit_shapes.py).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 2000, "Steps to train the Shapes ViT in --workdir when it has "
                                    "no checkpoint (0: no training, the model at its initialisation; for tests).")
_EVAL_IMAGES = flags.DEFINE_integer("eval_images", 0, "Validation images for agreement (0: the whole split).")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 250, "Agreement batch (also the batch its speed is timed at).")
_TINY = flags.DEFINE_bool("tiny", False, "One rate per method on a tiny Shapes ViT (both sections), 16 images: "
                          "for the test.")
_OUT = flags.DEFINE_string("out", os.path.join(RESULTS, "token_reduction"),
                           "Path and basename of the .json and .png written.")
_UPDATE = flags.DEFINE_bool("update", False, "Keep the other methods' rows of the existing --out JSON: rerun some "
                            "methods (--methods) into a full table. Each row's ratios are against the unreduced model "
                            "timed in its own run.")

# The 12-layer models of the speed section: ViT-B/16 (ToMe's and DeiT-B's shape) and DeiT-S.
SPEED_MODELS = {
    "vit_b16": dict(num_layers=12, embed_dim=768, num_heads=12, mlp_dim=3072, image_size=(224, 224), patch_size=16),
    "deit_s": dict(num_layers=12, embed_dim=384, num_heads=6, mlp_dim=1536, image_size=(224, 224), patch_size=16),
    "vit_tiny": dict(num_layers=4, embed_dim=32, num_heads=2, mlp_dim=64, image_size=(32, 32), patch_size=4),
}
COMMON = dict(vocab_size=1, channels=3, pooling="cls", qkv_bias=True, activation="gelu_exact", dropout_rate=0.0)
BASELINE = "none"  # the method name of the unreduced rows
# Methods whose schedule must fold the square patch grid by s x s windows (keep = 1 / s^2): Token-Shuffle.
WINDOW_FOLDS = ("token_shuffle",)


def rates(method: str, num_layers: int, tiny: bool = False) -> list[tuple[str, dict]]:
    """``[(label, model.tokens)]``: the method's two comparable reduction rates (see the module doc); ``tiny``:
    the stronger one only."""
    from effjax import tokens

    if method in WINDOW_FOLDS:  # one fold of 2 x 2 windows (keep 0.25), late or early
        layers = [num_layers // 2, max(num_layers // 4, 1)] if num_layers >= 4 else [1]
        found = [(f"keep=0.25@{layer}", dict(method=method, keep=0.25, layers=str(layer))) for layer in layers]
    elif tokens.spec(method).cap is not None:
        pair = (8, 16) if num_layers >= 12 else (4, 8)
        found = [(f"r={r}", dict(method=method, r=r)) for r in pair]
    else:
        layers = "3,6,9" if num_layers >= 12 else ",".join(str(i) for i in range(1, min(num_layers, 4)))
        found = [(f"keep={k}@{layers}", dict(method=method, keep=k, layers=layers)) for k in (0.7, 0.5)]
    return found[-1:] if tiny else found


def final_tokens(tokens_field, *, num_layers: int, num_tokens: int, prefix: int = 1) -> int:
    """Tokens left after the last block under ``tokens_field`` (``num_tokens`` when off)."""
    from effjax.tokens import plan

    found = plan.plan(tokens_field, num_layers=num_layers, num_tokens=num_tokens, prefix=prefix)
    left = [n for n in (found.counts if found else ()) if n is not None]
    return left[-1] if left else num_tokens


def _first_line(error: Exception, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:limit]


def build(fields: dict, tokens_field=None, num_classes: int = 1000):
    import effjax.models as models

    return models.build("vit_classifier", num_classes=num_classes, **{**fields, "tokens": tokens_field})


_INITIALISED = {}  # --tiny: (repr(model), shape) -> its variables at initialisation (seed 0), for both sections


def variables_for(model, images, base_params=None, tiny: bool = False):
    """The model's variables: ``base_params`` (the unreduced model's) where the trees match, the method's own
    parameters (learned methods) at their initialisation."""
    import flax
    import jax

    sample = images[:1]
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample)
    if base_params is not None:
        wanted = flax.traverse_util.flatten_dict(shapes["params"])
        have = flax.traverse_util.flatten_dict(base_params)
        if set(wanted) == set(have):
            return {"params": base_params}
    key = (repr(model), tuple(sample.shape))
    if key not in _INITIALISED:
        lowered = jax.jit(model.init).lower(jax.random.key(0), sample)
        variables = lowered.compile({"xla_backend_optimization_level": 0} if tiny else None)(jax.random.key(0), sample)
        if not tiny:
            return _merged(variables, base_params)
        _INITIALISED[key] = variables
    return _merged(_INITIALISED[key], base_params)


def _merged(variables, base_params):
    """``variables`` with ``base_params`` written over them (each of its params must exist there)."""
    import flax

    if base_params is None:
        return variables
    flat = flax.traverse_util.flatten_dict(variables["params"])
    missing = sorted("/".join(k) for k in flax.traverse_util.flatten_dict(base_params) if k not in flat)
    if missing:
        raise ValueError(f"the reduced model lacks the unreduced model's params {missing[:3]}")
    flat.update(flax.traverse_util.flatten_dict(base_params))
    return {**variables, "params": flax.traverse_util.unflatten_dict(flat)}


_COMPILED = {}  # --tiny: (model, shapes) -> (compiled forward, MACs per image), shared by the two sections


def compile_forward(model, variables, images, tiny: bool = False):
    """(compiled forward, MACs per image from XLA's cost analysis); the executable takes the variables as an
    argument, so one compile serves random and trained weights alike. ``tiny``: XLA's optimisation level 0
    (half the compile time; its timings mean nothing)."""
    import jax

    key = (repr(model), tuple(images.shape), str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), variables)))
    if key not in _COMPILED:
        lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images)
        macs = lowered.cost_analysis()["flops"] / 2 / images.shape[0]
        found = lowered.compile({"xla_backend_optimization_level": 0} if tiny else None), macs
        if not tiny:
            return found
        _COMPILED[key] = found
    return _COMPILED[key]


def time_pair(run, base, repeats: int) -> tuple[list, list]:
    """Seconds of ``run()`` and ``base()`` (each blocking), alternated ``repeats`` times after one warm-up each."""
    import jax

    jax.block_until_ready(run())
    jax.block_until_ready(base())
    mine, theirs = [], []
    for _ in range(repeats):
        for fn, out in ((run, mine), (base, theirs)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return mine, theirs


# ---------------------------------------------------------------------------------------------------------------
# (a) speed on the 12-layer models


def speed_rows(model_name: str, batch: int, methods: list[str], repeats: int, *, fields=None, params=None,
               num_classes: int = 1000, tiny: bool = False, log=print) -> list[dict]:
    """Rows of model ``model_name`` (``SPEED_MODELS``, or ``fields`` with ``params``) at ``batch``."""
    import numpy as np

    fields = fields or {**COMMON, **SPEED_MODELS[model_name]}
    images = np.random.default_rng(0).normal(size=(batch, *fields["image_size"], 3)).astype(np.float32)
    num_tokens = (fields["image_size"][0] // fields["patch_size"]) * (fields["image_size"][1] // fields["patch_size"])
    num_tokens += int(fields.get("pooling") == "cls")
    base_model = build(fields, num_classes=num_classes)
    base_vars = {"params": params} if params is not None else variables_for(base_model, images, tiny=tiny)
    base_fn, base_macs = compile_forward(base_model, base_vars, images, tiny)
    stamp = dict(section="speed", model=model_name, batch=batch)
    rows, base_samples = [], []
    for method in methods:
        for label, field in rates(method, fields["num_layers"], tiny):
            row = dict(stamp, method=method, schedule=label, tokens=field)
            try:
                model = build(fields, field, num_classes=num_classes)
                variables = variables_for(model, images, base_vars["params"], tiny)
                fn, macs = compile_forward(model, variables, images, tiny)
                left = final_tokens(field, num_layers=fields["num_layers"], num_tokens=num_tokens)
            except Exception as error:  # noqa: BLE001 - any method that cannot run here is reported, not fatal
                rows.append(dict(row, status=f"refused: {_first_line(error)}"))
                log(f"{model_name:8s} {method:20s} {label:16s} {rows[-1]['status']}")
                continue
            mine, theirs = time_pair(lambda fn=fn, v=variables: fn(v, images), lambda: base_fn(base_vars, images),
                                     repeats)
            base_samples += theirs
            seconds, base_seconds = statistics.median(mine), statistics.median(theirs)
            rows.append(dict(row, status="ok", learned=_learned(method), final_tokens=left, gflops=macs / 1e9,
                             gflops_ratio=macs / base_macs, seconds=seconds, images_per_s=batch / seconds,
                             speed_ratio=base_seconds / seconds))
            log(f"{model_name:8s} {method:20s} {label:16s} {macs / 1e9:7.2f} GFLOPs ({macs / base_macs:.2f})  "
                f"{batch / seconds:8.1f} img/s (x{base_seconds / seconds:.2f})")
    if not base_samples:  # every method refused: time the baseline alone
        base_samples = time_pair(lambda: base_fn(base_vars, images), lambda: base_fn(base_vars, images), repeats)[0]
    base_seconds = statistics.median(base_samples)
    base = dict(stamp, method=BASELINE, schedule="-", tokens=None, status="ok", learned=False,
                final_tokens=num_tokens, gflops=base_macs / 1e9, gflops_ratio=1.0, seconds=base_seconds,
                images_per_s=batch / base_seconds, speed_ratio=1.0)
    log(f"{model_name:8s} {BASELINE:20s} {'-':16s} {base_macs / 1e9:7.2f} GFLOPs"
        f"{batch / base_seconds:17.1f} img/s")
    return [base] + rows


def _learned(method: str) -> bool:
    from effjax import tokens

    return bool(tokens.spec(method).learned)


# ---------------------------------------------------------------------------------------------------------------
# (b) agreement on the trained Shapes ViT


def shapes_config(train_steps: int, tiny: bool = False):
    """``configs/vit_shapes.py`` trained ``train_steps`` steps (``tiny``: a 2-layer model on few images)."""
    from configs import vit_shapes

    c = vit_shapes.get_config()
    c.total_steps = max(train_steps, 1)
    c.eval_every = c.checkpoint_every = c.total_steps
    c.warmup_steps = min(c.warmup_steps, train_steps // 10)
    if tiny:
        c.batch_size = 16
        c.eval_batch_size = 16
        c.eval_max_batches = 1
        c.log_every = c.total_steps
        c.model.num_layers = 2
        c.model.embed_dim = 32
        c.model.num_heads = 2
        c.model.mlp_dim = 64
        c.data.num_train = 512
        c.data.num_validation = 64
    return c


def latest_step(workdir: str) -> int | None:
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps) if steps else None


def load_params(workdir: str, step: int):
    """The params of checkpoint ``step`` in ``workdir`` on one device, whatever mesh wrote them."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    return checkpointer.restore(path, target)["params"]


def _model_fields(model_config: dict, vocab_size: int) -> dict:
    """vit_classifier fields from a config's ``model`` section (JSON or ``to_dict``), without ``tokens``."""
    fields = {k: v for k, v in model_config.items() if k not in ("name", "tokens")}
    fields["image_size"] = tuple(fields["image_size"])
    fields["full_attention_layers"] = tuple(fields.get("full_attention_layers") or ())
    return {**fields, "vocab_size": vocab_size}


def shapes_model(workdir: str, train_steps: int = 2000, tiny: bool = False, log=print) -> dict:
    """The trained Shapes ViT of ``workdir`` (trained there first when it has no checkpoint; ``train_steps=0``:
    not trained, a model at its initialisation, for tests): ``{"fields": vit_classifier fields, "params",
    "step", "data": the data config, "num_classes", "workdir"}``."""
    import numpy as np

    from effjax import data as data_lib
    from effjax.train import trainer

    step = latest_step(workdir) if workdir else None
    if step is None and train_steps > 0:
        log(f"no checkpoint in {workdir}: training configs/vit_shapes.py for {train_steps} steps there"
            + (" (tiny)" if tiny else ""))
        trainer.train_and_evaluate(shapes_config(train_steps, tiny), workdir)
        step = latest_step(workdir)
    if step is None:  # train_steps=0: the config's model at its initialisation
        config = json.loads(shapes_config(0, tiny).to_json_best_effort())
    else:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
    data = {k: v for k, v in config["data"].items() if k != "name"}
    source = data_lib.make_source(config["data"]["name"], "validation", **data)
    fields = _model_fields(config["model"], source.vocab_size)
    if step is None:
        model = build(fields, num_classes=source.num_classes)
        sample = np.zeros((1, *fields["image_size"], fields["channels"]), np.float32)
        params = variables_for(model, sample, tiny=tiny)["params"]
    else:
        params = load_params(workdir, step)
    return {"fields": fields, "params": params, "step": step or 0, "data": config["data"],
            "num_classes": source.num_classes, "workdir": workdir}


def validation_images(trained: dict, count: int = 0):
    """``(images [n, h, w, 3] float32 in [0, 1], labels [n])`` of the Shapes validation split (``count`` > 0: the
    first ``count``)."""
    import numpy as np

    from effjax import data as data_lib

    data = {k: v for k, v in trained["data"].items() if k != "name"}
    source = data_lib.make_source(trained["data"]["name"], "validation", **data)
    n = len(source) if count <= 0 else min(count, len(source))
    pairs = [source.image(i) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    return images, np.array([p[1] for p in pairs])


def predict(fn, variables, images, batch: int):
    """Top-1 predictions over ``images`` in batches of ``batch`` (the last one padded)."""
    import numpy as np

    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(variables, chunk)).argmax(-1)[:batch - pad])
    return np.concatenate(out)


def agreement_rows(trained: dict, methods: list[str], *, images, labels, batch: int, repeats: int, tiny=False,
                   log=print) -> list[dict]:
    import numpy as np

    fields = trained["fields"]
    batch = min(batch, len(images))
    timing = images[:batch]
    num_tokens = (fields["image_size"][0] // fields["patch_size"]) * (fields["image_size"][1] // fields["patch_size"])
    num_tokens += int(fields.get("pooling") == "cls")
    base_model = build(fields, num_classes=trained["num_classes"])
    base_vars = {"params": trained["params"]}
    base_fn, base_macs = compile_forward(base_model, base_vars, timing, tiny)
    reference = predict(base_fn, base_vars, images, batch)
    base_accuracy = float(np.mean(reference == labels))
    stamp = dict(section="agreement", model="shapes_vit", batch=batch, images=len(images), step=trained["step"])
    rows, base_samples = [], []
    for method in methods:
        for label, field in rates(method, fields["num_layers"], tiny):
            row = dict(stamp, method=method, schedule=label, tokens=field)
            try:
                model = build(fields, field, num_classes=trained["num_classes"])
                variables = variables_for(model, timing, trained["params"], tiny)
                fn, macs = compile_forward(model, variables, timing, tiny)
                left = final_tokens(field, num_layers=fields["num_layers"], num_tokens=num_tokens)
            except Exception as error:  # noqa: BLE001
                rows.append(dict(row, status=f"refused: {_first_line(error)}"))
                log(f"shapes   {method:20s} {label:16s} {rows[-1]['status']}")
                continue
            predictions = predict(fn, variables, images, batch)
            mine, theirs = time_pair(lambda fn=fn, v=variables: fn(v, timing), lambda: base_fn(base_vars, timing),
                                     repeats)
            base_samples += theirs
            accuracy = float(np.mean(predictions == labels))
            agree = float(np.mean(predictions == reference))
            speed = statistics.median(theirs) / statistics.median(mine)
            rows.append(dict(row, status="ok", learned=_learned(method), final_tokens=left, agreement=agree,
                             accuracy=accuracy, accuracy_drop=base_accuracy - accuracy, gflops=macs / 1e9,
                             gflops_ratio=macs / base_macs, images_per_s=batch / statistics.median(mine),
                             speed_ratio=speed))
            log(f"shapes   {method:20s} {label:16s} agreement {agree:.3f}  accuracy {accuracy:.3f} "
                f"({accuracy - base_accuracy:+.3f})  x{speed:.2f} img/s  GFLOPs x{macs / base_macs:.2f}")
    if not base_samples:
        base_samples = time_pair(lambda: base_fn(base_vars, timing), lambda: base_fn(base_vars, timing), repeats)[0]
    base = dict(stamp, method=BASELINE, schedule="-", tokens=None, status="ok", learned=False, final_tokens=num_tokens,
                agreement=1.0, accuracy=base_accuracy, accuracy_drop=0.0, gflops=base_macs / 1e9, gflops_ratio=1.0,
                images_per_s=batch / statistics.median(base_samples), speed_ratio=1.0)
    log(f"shapes   {BASELINE:20s} {'-':16s} accuracy {base_accuracy:.3f}")
    return [base] + rows


# ---------------------------------------------------------------------------------------------------------------
# tables and plot


def _name(row) -> str:
    return f"`{row['method']}`" + (" (untrained)" if row.get("learned") else "")


def speed_table(rows: list[dict]) -> str:
    """Markdown: per method and schedule, tokens left, GFLOPs and the GFLOPs and images/s ratios."""
    lines = ["| method | schedule | tokens left | GFLOPs | GFLOPs ratio | images/s ratio |", "|---" * 6 + "|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {_name(r)} | {r['schedule']} | {r['status']} | | | |")
            continue
        lines.append(f"| {_name(r)} | {r['schedule']} | {r['final_tokens']} | {r['gflops']:.2f} | "
                     f"{r['gflops_ratio']:.2f} | {r['speed_ratio']:.2f} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    lines = ["| method | schedule | tokens left | agreement | accuracy | drop | images/s ratio | GFLOPs ratio |",
             "|---" * 8 + "|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {_name(r)} | {r['schedule']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {_name(r)} | {r['schedule']} | {r['final_tokens']} | {r['agreement']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['accuracy_drop'] * 100:+.1f} pt | {r['speed_ratio']:.2f} | "
                     f"{r['gflops_ratio']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agreement = [r for r in results.get("agreement", []) if r["status"] == "ok"]
    speed = [r for r in results.get("speed", []) if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    methods = sorted({r["method"] for r in agreement + speed} - {BASELINE})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
    color[BASELINE] = "black"
    marker = {m: "osD^v<>p*h"[i // len(colors) % 10] for i, m in enumerate(methods)}
    marker[BASELINE] = "s"
    for r in agreement:
        axes[0].scatter(r["agreement"], r["speed_ratio"], color=color[r["method"]], marker=marker[r["method"]],
                        s=40, label=r["method"])
        axes[0].annotate(r["schedule"].split("@")[0], (r["agreement"], r["speed_ratio"]), fontsize=6,
                         xytext=(3, 3), textcoords="offset points")
    step = agreement[0]["step"] if agreement else "?"
    axes[0].set(xlabel="top-1 agreement with the unreduced model", ylabel="images/s ratio (speed-up)",
                title=f"Shapes ViT (checkpoint step {step}), no retraining")
    shapes = {"vit_b16": "o", "deit_s": "^", "vit_tiny": "s", "shapes_vit": "s"}
    batch = speed[0]["batch"] if speed else None
    shown = [r for r in speed if r["batch"] == batch]
    for r in shown:
        axes[1].scatter(r["gflops_ratio"], r["speed_ratio"], color=color[r["method"]],
                        marker=shapes.get(r["model"], "x"), s=40)
    if shown:
        low = max(0.2, min(r["gflops_ratio"] for r in shown) - 0.05)
        grid = [low + (1.05 - low) * i / 50 for i in range(51)]
        axes[1].plot(grid, [1 / x for x in grid], color="grey", lw=0.8, ls="--", label="speed-up = 1 / GFLOPs ratio")
        axes[1].legend(fontsize=7, loc="upper right")
    models = list(dict.fromkeys(r["model"] for r in shown))
    axes[1].set(xlabel="GFLOPs ratio (XLA cost analysis)", ylabel="images/s ratio (speed-up)",
                title=", ".join(f"{m} ({shapes.get(m, 'x')})" for m in models) + f", batch {batch}")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        fig.legend(unique.values(), unique.keys(), loc="center right", fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.87, wspace=0.22)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name() -> str:
    import jax

    return (f"{jax.devices()[0].device_kind} x{jax.device_count()} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")


def run(*, sections=("speed", "agreement"), methods=(), models=(), batches=(), repeats=0, workdir="/tmp/vit_shapes",
        train_steps=2000, eval_images=0, eval_batch=250, tiny=False, log=print) -> dict:
    """Both sections (see the module doc) as ``{"speed": rows, "agreement": rows, ...}``; the API behind main.

    ``tiny``: one rate per method, a 2-layer Shapes ViT (trained ``train_steps`` steps when ``workdir`` has no
    checkpoint), 16 images, and the speed section times that same model (sharing its compiled forwards)."""
    from effjax import tokens

    methods = list(methods) or tokens.names()
    for method in methods:
        tokens.check_name(method)
    repeats = repeats or (2 if tiny else 5)
    if tiny:
        eval_images, eval_batch = eval_images or 16, min(eval_batch, 8)
    results = {"date": datetime.date.today().isoformat(), "device": device_name(), "methods": methods,
               "repeats": repeats, "tiny": tiny, "speed": [], "agreement": []}
    trained = None
    if "agreement" in sections or (tiny and not models):
        trained = shapes_model(workdir, train_steps, tiny, log=log)
    if "speed" in sections:
        if tiny and not models:
            batch = min(eval_batch, eval_images)
            log(f"\n== speed: the Shapes ViT, batch {batch}, median of {repeats}")
            results["speed"] += speed_rows("shapes_vit", batch, methods, repeats, fields=trained["fields"],
                                           params=trained["params"], num_classes=trained["num_classes"], tiny=True,
                                           log=log)
        for model in models or ([] if tiny else ["vit_b16", "deit_s"]):
            for batch in [int(b) for b in batches] or [8]:
                log(f"\n== speed: {model}, batch {batch}, median of {repeats}")
                results["speed"] += speed_rows(model, batch, methods, repeats, tiny=tiny, log=log)
    if "agreement" in sections:
        images, labels = validation_images(trained, eval_images)
        log(f"\n== agreement: Shapes ViT {workdir} step {trained['step']}, {len(images)} validation images, "
            f"batch {min(eval_batch, len(images))}")
        results["agreement"] = agreement_rows(trained, methods, images=images, labels=labels, batch=eval_batch,
                                              repeats=repeats, tiny=tiny, log=log)
        results["shapes"] = {"workdir": workdir, "step": trained["step"], "images": len(images),
                             "accuracy": results["agreement"][0]["accuracy"],
                             "num_layers": trained["fields"]["num_layers"], "embed_dim": trained["fields"]["embed_dim"]}
    return results


def tables(results: dict) -> str:
    parts = [f"{results['date']}, {results['device']}; forward only, float32, median of {results['repeats']} runs; "
             "ratios against the unreduced model timed in the same loop."]
    keys = sorted({(r["model"], r["batch"]) for r in results["speed"]}, key=lambda k: (-len(k[0]), k))
    for model, batch in keys:
        parts.append(f"\n### Speed: {model}, batch {batch}\n\n"
                     + speed_table([r for r in results["speed"] if (r["model"], r["batch"]) == (model, batch)]))
    if results["agreement"]:
        s = results["shapes"]
        parts.append(f"\n### Agreement: Shapes ViT (step {s['step']}), {s['images']} validation images, batch "
                     f"{results['agreement'][0]['batch']}\n\n" + agreement_table(results["agreement"]))
    return "\n".join(parts)


def finite(results: dict) -> bool:
    """Every 'ok' row's ratios are finite numbers."""
    keys = ("gflops_ratio", "speed_ratio", "agreement", "accuracy_drop")
    return all(math.isfinite(r[k]) for r in results["speed"] + results["agreement"] if r["status"] == "ok"
               for k in keys if k in r)


def updated(old: dict, new: dict) -> dict:
    """``old`` results with the rows of ``new``'s methods replaced by ``new``'s (sections ``new`` ran); the
    unreduced rows stay ``old``'s, and ``reruns`` lists the dates and methods of the replacements."""
    methods = set(new["methods"])
    merged = dict(old, methods=list(old["methods"]) + [m for m in new["methods"] if m not in old["methods"]])
    order = {m: i for i, m in enumerate(merged["methods"])}
    for section in ("speed", "agreement"):
        if not new[section]:
            continue
        rows = [r for r in old[section] if r["method"] not in methods] + [
            r for r in new[section] if r["method"] in methods]
        groups = {}
        for r in old[section] + new[section]:
            groups.setdefault((r["model"], r["batch"]), len(groups))
        merged[section] = sorted(rows, key=lambda r, groups=groups: (  # stable: a method's rates stay in order
            groups[(r["model"], r["batch"])], r["method"] != BASELINE, order.get(r["method"], -1)))
    merged["reruns"] = list(old.get("reruns", [])) + [{"date": new["date"], "methods": new["methods"]}]
    return merged


def main(argv):
    del argv
    results = run(sections=_SECTIONS.value, methods=_METHODS.value, models=_MODELS.value, batches=_BATCH.value,
                  repeats=_REPEATS.value, workdir=_WORKDIR.value, train_steps=_TRAIN_STEPS.value,
                  eval_images=_EVAL_IMAGES.value, eval_batch=_EVAL_BATCH.value, tiny=_TINY.value,
                  log=functools.partial(print, flush=True))
    base = _OUT.value
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    if _UPDATE.value and os.path.isfile(base + ".json"):
        with open(base + ".json") as f:
            results = updated(json.load(f), results)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, base + ".png")
    print("\n" + tables(results))
    print(f"\nwrote {base}.json and .png")


if __name__ == "__main__":
    app.run(main)

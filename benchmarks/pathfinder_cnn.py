"""Is the generated Pathfinder learnable? A CNN trained on it for a few minutes (a check of the data, not LRA).

  python benchmarks/pathfinder_cnn.py                       # the CPU-size data of configs/lra_pathfinder.py:size=cpu
  python benchmarks/pathfinder_cnn.py --steps=3000 --contour_length=6
  python benchmarks/pathfinder_cnn.py --model=resnet --contour_length=6 --num_train=100000 --steps=2000

``--model`` picks the network. ``small`` (the default): four 3x3 conv + ReLU layers (two strided) and a global mean;
each output sees only ~15 of the 32 pixels, likely too little to follow a snake from one circle to the other.
``resnet``: a compact ResNet for 32x32 inputs (a 3x3 conv stem of ``--width`` channels, then three stages of two
basic blocks at widths 1x/2x/4x with stride 2 between stages, BatchNorm, global mean, Dense(2)); its receptive
field is 53 pixels, so a unit near the centre sees the whole image. BatchNorm's running statistics are updated in
the train step and used at evaluation.

Transformers need hundreds of epochs on Pathfinder (LRA's run 200), so a CPU-sized Transformer run staying at 50%
says nothing about the data. A CNN sees the 2-D layout and learns Pathfinder-32 quickly (a ResNet-18 reaches over
80%, lra.md §3.5, issue #38), so if this one climbs well above 50% the labels follow the images; if it stays at
chance the generator is suspect. Prints validation accuracy every ``--eval_every`` steps and appends the final row
to ``benchmarks/results/pathfinder_cnn.jsonl`` with the model, device, date and the curve of [step, accuracy].
"""

import datetime
import json
import os
import platform
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_STEPS = flags.DEFINE_integer("steps", 1500, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Image side.")
_CONTOUR = flags.DEFINE_integer("contour_length", 14, "Paddles per target snake (14 = hard).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 20_000, "Training images (the CPU-size LRA config's).")
_MODEL = flags.DEFINE_enum("model", "small", ["small", "resnet"], "small: the 4-layer CNN; resnet: a compact ResNet.")
_WIDTH = flags.DEFINE_integer("width", 32, "resnet: the stem's and first stage's channels (then 2x, 4x).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Steps between validation passes.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "pathfinder_cnn.jsonl"), "Rows.")


def build(model: str = "small", width: int = 32):
    """The flax module; both take ``train`` (the small CNN ignores it; the ResNet's BatchNorm uses batch statistics)."""
    from flax import linen as nn

    class Cnn(nn.Module):
        """Four 3x3 conv + ReLU stages (two of them strided), global mean, a linear head."""

        @nn.compact
        def __call__(self, x, train: bool = False):
            del train
            for width, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
                x = nn.relu(nn.Conv(width, (3, 3), strides=stride)(x))
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    class Block(nn.Module):
        """A basic residual block: two 3x3 conv + BatchNorm, a 1x1 projection where the shape changes."""

        width: int
        stride: int = 1

        @nn.compact
        def __call__(self, x, train: bool):
            norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
            y = nn.relu(norm()(nn.Conv(self.width, (3, 3), strides=self.stride, use_bias=False)(x)))
            y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
            if x.shape[-1] != self.width or self.stride != 1:
                x = norm()(nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False)(x))
            return nn.relu(x + y)

    class ResNet(nn.Module):
        """3x3 stem, stages of two blocks at width, 2x, 4x (stride 2 between), global mean, a linear head."""

        width: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
                nn.Conv(self.width, (3, 3), use_bias=False)(x)))
            for stage, multiple in enumerate((1, 2, 4)):
                for block in range(2):
                    x = Block(self.width * multiple, stride=2 if stage and not block else 1)(x, train)
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    return ResNet(width) if model == "resnet" else Cnn()


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from effjax import data

    params = dict(resolution=_RESOLUTION.value, contour_length=_CONTOUR.value, num_train=_NUM_TRAIN.value,
                  num_validation=2000, num_test=2000)
    train, val = (data.make_source("pathfinder", split, **params) for split in ("train", "validation"))
    side = _RESOLUTION.value

    def images(source, idx):
        x = np.stack([source[int(i)]["inputs"] for i in idx]).astype(np.float32) - 1  # tokens are pixel + 1
        return x.reshape(-1, side, side, 1) / 255.0, np.array([int(source[int(i)]["targets"]) for i in idx])

    model = build(_MODEL.value, _WIDTH.value)
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, side, side, 1))))
    params_count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    print(f"model {_MODEL.value}: {params_count:,} parameters", flush=True)
    tx = optax.adam(_LR.value)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(p):
            logits, state = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state)
        return {**variables, **state, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))  # train=False: BatchNorm's running stats

    def accuracy():
        x, y = images(val, range(len(val)))
        return float(np.mean(np.concatenate([np.asarray(predict(variables, x[i:i + 500]))
                                             for i in range(0, len(x), 500)]) == y))

    rng, start, acc, curve = np.random.default_rng(0), time.time(), None, []
    for i in range(1, _STEPS.value + 1):
        x, y = images(train, rng.integers(0, len(train), _BATCH.value))
        variables, opt_state, loss = step(variables, opt_state, x, y)
        if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
            acc = accuracy()
            curve.append([i, acc])
            print(f"step {i}: loss {float(loss):.4f}, validation accuracy {100 * acc:.2f}% "
                  f"({time.time() - start:.0f} s)", flush=True)
    row = {"date": datetime.date.today().isoformat(), "device": f"{jax.devices()[0].platform} ({platform.machine()})",
           "model": _MODEL.value, "parameters": params_count, **params, "steps": _STEPS.value, "batch": _BATCH.value,
           "learning_rate": _LR.value, **({"width": _WIDTH.value} if _MODEL.value == "resnet" else {}),
           "validation_accuracy": acc, "curve": curve, "seconds": round(time.time() - start)}
    with open(_OUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)

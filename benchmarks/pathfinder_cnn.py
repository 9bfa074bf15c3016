"""Is the generated Pathfinder learnable? A small CNN trained on it for a few minutes (a check of the data, not LRA).

  python benchmarks/pathfinder_cnn.py                       # the CPU-size data of configs/lra_pathfinder.py:size=cpu
  python benchmarks/pathfinder_cnn.py --steps=3000 --contour_length=6

Transformers need hundreds of epochs on Pathfinder (LRA's run 200), so a CPU-sized Transformer run staying at 50%
says nothing about the data. A CNN sees the 2-D layout and learns Pathfinder-32 quickly (a ResNet-18 reaches over
80%, lra.md §3.5, issue #38), so if this one climbs well above 50% the labels follow the images; if it stays at
chance the generator is suspect. Prints validation accuracy every ``--eval_every`` steps and appends the final row
to ``benchmarks/results/pathfinder_cnn.jsonl`` with device and date.
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
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Steps between validation passes.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "pathfinder_cnn.jsonl"), "Rows.")


def build():
    from flax import linen as nn

    class Cnn(nn.Module):
        """Four 3x3 conv + ReLU stages (two of them strided), global mean, a linear head."""

        @nn.compact
        def __call__(self, x):
            for width, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
                x = nn.relu(nn.Conv(width, (3, 3), strides=stride)(x))
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    return Cnn()


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

    model = build()
    variables = model.init(jax.random.key(0), jnp.zeros((1, side, side, 1)))
    tx = optax.adam(1e-3)
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state, loss

    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))

    def accuracy():
        x, y = images(val, range(len(val)))
        return float(np.mean(np.concatenate([np.asarray(predict(variables, x[i:i + 500]))
                                             for i in range(0, len(x), 500)]) == y))

    rng, start, acc = np.random.default_rng(0), time.time(), None
    for i in range(1, _STEPS.value + 1):
        x, y = images(train, rng.integers(0, len(train), _BATCH.value))
        variables, opt_state, loss = step(variables, opt_state, x, y)
        if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
            acc = accuracy()
            print(f"step {i}: loss {float(loss):.4f}, validation accuracy {100 * acc:.2f}% "
                  f"({time.time() - start:.0f} s)", flush=True)
    row = {"date": datetime.date.today().isoformat(), "device": f"{jax.devices()[0].platform} ({platform.machine()})",
           **params, "steps": _STEPS.value, "batch": _BATCH.value, "validation_accuracy": acc,
           "seconds": round(time.time() - start)}
    with open(_OUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)

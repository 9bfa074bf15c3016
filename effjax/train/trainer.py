"""The training loop: mesh -> data -> state -> restore -> train/eval/checkpoint, in that order."""

import contextlib
import functools
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import linen as nn
from jax.experimental import multihost_utils

import effjax.models
from effjax import data as data_lib
from effjax.data import pipeline
from effjax.train import checkpoint, metrics, optim, sharding, steps, tasks
from effjax.train import state as state_lib
from effjax.train.validate import validate


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped without saving the bad state."""


class _Preemption:
    """Records SIGTERM so the loop can checkpoint and exit between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int, sync_every: int) -> bool:
        """True on every process once any process was asked to stop (agreed every ``sync_every`` steps)."""
        if jax.process_count() == 1:
            return self.requested
        if step % sync_every:
            return False
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


def _data_sources(config):
    params = {k: v for k, v in config.data.to_dict().items() if k != "name"}
    make = functools.partial(data_lib.make_source, config.data.name, **params)
    return make("train"), make("validation")


def _build_model(config, source):
    model_params = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    return effjax.models.build(config.model.name, vocab_size=source.vocab_size,
                               num_classes=source.num_classes, **model_params)


def _loss_fn(config, source):
    task = effjax.models.task_of(config.model.name)
    if task != source.task:
        raise ValueError(f"config.model.name={config.model.name!r} trains on {task!r} data but "
                         f"config.data.name={config.data.name!r} provides {source.task!r} data.")
    if task == "classification":
        return functools.partial(tasks.classification, num_classes=source.num_classes,
                                 label_smoothing=config.label_smoothing)
    return tasks.lm


class Run:
    """The compiled pieces of one training run (also used directly by tests, benchmarks and colabs)."""

    def __init__(self, config, devices=None):
        self.config = config
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        validate(config, process_count=jax.process_count(),
                 batch_shards=sharding.batch_shards(self.mesh, self.rules))
        self.train_source, self.eval_source = _data_sources(config)
        self.model = _build_model(config, self.train_source)
        self.loss_fn = _loss_fn(config, self.train_source)
        self.tx, self.schedule = optim.make_optimizer(config)
        sample = jnp.zeros((1, self.train_source.max_length), jnp.int32)
        init_fn = state_lib.make_init_fn(self.model, self.tx, sample)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.init_state, self.state_sharding, self.abstract_state = state_lib.sharded_init(
            init_fn, config.seed, self.mesh, self.rules)
        with self._context():
            self.train_step = jax.jit(
                functools.partial(steps.train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn,
                                  schedule=self.schedule),
                in_shardings=(self.state_sharding, self.batch_sharding),
                out_shardings=(self.state_sharding, None), donate_argnums=0)
            self.eval_step = jax.jit(
                functools.partial(steps.eval_step, model=self.model, loss_fn=self.loss_fn),
                in_shardings=(self.state_sharding.params, self.state_sharding.model_state, self.batch_sharding))

    @contextlib.contextmanager
    def _context(self):
        """The mesh and logical axis rules under which every jitted function traces."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def train_iterator(self):
        return pipeline.train_iterator(
            self.train_source, global_batch_size=self.config.batch_size, seed=self.config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())

    def step(self, state, local_batch):
        with self._context():
            return self.train_step(state, sharding.global_batch(local_batch, self.batch_sharding))

    def evaluate(self, state) -> dict:
        """Metrics over the validation split (or its first ``eval_max_batches`` batches)."""
        batches = pipeline.eval_batches(
            self.eval_source, global_batch_size=self.config.eval_batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        total = None
        with self._context():
            for i, local_batch in enumerate(batches):
                if self.config.eval_max_batches and i >= self.config.eval_max_batches:
                    break
                sums = self.eval_step(state.params, state.model_state,
                                      sharding.global_batch(local_batch, self.batch_sharding))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return tasks.summarize(jax.device_get(total))


def _check_finite(window, first_step, last_good_ckpt):
    losses = np.array([float(m["loss"]) for m in window])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0]) + 1
        raise NonFiniteLossError(
            f"Loss became {losses[bad[0]]} at step {step} (between steps {first_step} and "
            f"{first_step + len(window)}). The run stopped; the last good checkpoint is step "
            f"{last_good_ckpt}. Lower config.learning_rate, set config.grad_clip_norm, or check the data.")


def _log_window(writer, bar, window, step, seconds):
    means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
    means["steps_per_sec"] = len(window) / max(seconds, 1e-9)
    writer.write(step, {f"train/{k}" if k != "steps_per_sec" else k: v for k, v in means.items()})
    if bar is not None:
        bar.set_postfix(loss=f"{means['loss']:.4f}", steps_per_s=f"{means['steps_per_sec']:.2f}")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns final metrics."""
    run = Run(config)
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    data_iterator = run.train_iterator()
    resume_step = checkpoint.check_compatible(manager, run.abstract_state)
    if resume_step is None:
        state = run.init_state()
    else:
        state = checkpoint.restore(manager, resume_step, run.abstract_state, data_iterator)
        if jax.process_index() == 0:
            print(f"Resuming from the checkpoint at step {resume_step} in {workdir}.", flush=True)
    metrics.write_config(workdir, config)
    step = int(resume_step or 0)
    last_ckpt = resume_step
    writer = metrics.MetricWriter(workdir, resume_step=step)
    is_chief = jax.process_index() == 0
    bar = tqdm.tqdm(total=config.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not is_chief)
    window, window_start, window_time = [], step, time.perf_counter()
    eval_metrics = {}

    def flush():
        nonlocal window, window_start, window_time
        if window:
            _check_finite(window, window_start, last_ckpt)
            _log_window(writer, bar, window, step, time.perf_counter() - window_time)
        window, window_start, window_time = [], step, time.perf_counter()

    def save():
        nonlocal last_ckpt
        flush()
        checkpoint.save(manager, state, data_iterator, config)
        last_ckpt = step

    try:
        with _Preemption() as preemption:
            while step < config.total_steps:
                state, step_metrics = run.step(state, next(data_iterator))
                step += 1
                window.append(step_metrics)
                bar.update(1)
                if step % config.log_every == 0:
                    flush()
                if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
                    flush()
                    eval_metrics = run.evaluate(state)
                    writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                    window_time = time.perf_counter()  # steps/s measures training, not evaluation
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save()
                if preemption.reached(step, config.log_every):
                    if last_ckpt != step:
                        save()
                    manager.wait_until_finished()
                    logging.warning("SIGTERM: saved a checkpoint at step %d and stopped.", step)
                    return {"preempted_at_step": step}
            if last_ckpt != step:
                save()
            flush()
            eval_metrics = run.evaluate(state)
            writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if hasattr(data_iterator, "close"):
            data_iterator.close()
    return {"step": step, **{f"eval/{k}": v for k, v in eval_metrics.items()}}


def summary_line(result: dict) -> str:
    """The one line the command prints at the end of a run."""
    if "preempted_at_step" in result:
        return (f"Stopped by SIGTERM at step {result['preempted_at_step']} after saving a checkpoint; "
                "run the same command again to resume.")
    line = f"Finished {result['step']} steps. Final validation loss {result['eval/loss']:.4f}"
    if "eval/majority_class_rate" in result:
        line += (f", accuracy {100 * result['eval/accuracy']:.2f}% "
                 f"(majority-class rate of this split: {100 * result['eval/majority_class_rate']:.2f}%)")
    else:
        line += f" ({result['eval/loss'] / np.log(2):.3f} bits per token)"
    return line + "."

"""The training loop: mesh -> data -> state -> restore -> train/eval/checkpoint, in that order."""

import contextlib
import functools
import logging
import os
import signal
import sys
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
from effjax.train import checkpoint, metrics, optim, sharding, steps, tasks, warm_start
from effjax.train import state as state_lib
from effjax.train import workdir as workdir_lib
from effjax.train.checkpoint import last_good_phrase
from effjax.train.validate import validate


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped without saving the bad state."""


class _Preemption:
    """Records SIGTERM or a first Ctrl-C (SIGINT) so the run can checkpoint and stop between steps.

    A second Ctrl-C exits at once (status 130) without saving; the checkpoints already on disk stay.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the name of the first stop signal received
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            sys.stderr.write("effjax: second Ctrl-C: exiting at once without saving; the checkpoints on disk "
                             "are kept.\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def reached(self, step: int, sync_every: int) -> bool:
        """True on every process once any process was asked to stop (agreed every ``sync_every`` steps)."""
        if jax.process_count() == 1:
            return self.requested is not None
        if step % sync_every:
            return False
        flags = multihost_utils.process_allgather(np.array(self.requested is not None))
        return bool(np.any(flags))


def data_source(config, split: str):
    """The source of ``split`` ('train', 'validation' or 'test') for ``config.data``."""
    params = {k: v for k, v in config.data.to_dict().items() if k != "name"}
    return data_lib.make_source(config.data.name, split, **params)


def data_sources(config):
    return data_source(config, "train"), data_source(config, "validation")


def _build_model(config, source):
    model_params = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    return effjax.models.build(config.model.name, vocab_size=source.vocab_size,
                               num_classes=source.num_classes, **model_params)


def _loss_fn(config, source):
    task = effjax.models.task_of(config.model.name)
    if task == "pretrain":  # denoises the inputs of any source (classification or lm); its labels go unused
        return tasks.pretrain
    if task != source.task:
        raise ValueError(f"config.model.name={config.model.name!r} trains on {task!r} data but "
                         f"config.data.name={config.data.name!r} provides {source.task!r} data.")
    if task == "classification":
        return functools.partial(tasks.classification, num_classes=source.num_classes,
                                 label_smoothing=config.label_smoothing)
    return tasks.lm


class Run:
    """The compiled pieces of one training run (also used directly by tests, benchmarks and colabs)."""

    def __init__(self, config, devices=None, sources=None):
        """``sources``: the ``(train, validation)`` data sources when the caller already built them for this
        ``config.data`` (the architecture search trains many models on one data set)."""
        self.config = config
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        validate(config, process_count=jax.process_count(),
                 batch_shards=sharding.batch_shards(self.mesh, self.rules))
        self.train_source, self.eval_source = sources or data_sources(config)
        self._eval_sources = {"validation": self.eval_source}  # other splits are built on first use
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
            self.next_loss_step = jax.jit(
                functools.partial(_loss_and_finite_params, train_step=functools.partial(
                    steps.train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn, schedule=self.schedule)),
                in_shardings=(self.state_sharding, self.batch_sharding))
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

    def check_state(self, state, data_iterator) -> tuple[float, bool]:
        """(the loss ``state`` gives on the next training batch, whether all its parameters are finite).

        The loss is the one the next train step will report, so a state whose update diverged (finite but
        huge parameters) shows here before it is saved. The iterator is left where it was.
        """
        position = data_iterator.get_state()
        local_batch = next(data_iterator)
        data_iterator.set_state(position)
        with self._context():
            loss, finite = self.next_loss_step(state, sharding.global_batch(local_batch, self.batch_sharding))
        return float(loss), bool(finite)

    def evaluate(self, state, split: str = "validation") -> dict:
        """Metrics over ``split``: the validation split (or its first ``eval_max_batches`` batches), or the whole
        of another split (the test split reported at the end is never cut short)."""
        if split not in self._eval_sources:
            self._eval_sources[split] = data_source(self.config, split)
        batches = pipeline.eval_batches(
            self._eval_sources[split], global_batch_size=self.config.eval_batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        max_batches = self.config.eval_max_batches if split == "validation" else 0
        total = None
        with self._context():
            for i, local_batch in enumerate(batches):
                if max_batches and i >= max_batches:
                    break
                sums = self.eval_step(state.params, state.model_state,
                                      sharding.global_batch(local_batch, self.batch_sharding))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return tasks.summarize(jax.device_get(total))


_DIVERGENCE_HINT = "Lower config.learning_rate, set config.grad_clip_norm, or check the data."


def _loss_and_finite_params(state, batch, *, train_step):
    """The train step's loss on ``batch`` and whether ``state.params`` are all finite (the update is dead code)."""
    _, step_metrics = train_step(state, batch)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(state.params)]))
    return step_metrics["loss"], finite


def _check_saveable(run, state, data_iterator, step, last_good_ckpt):
    """Raises NonFiniteLossError unless ``state`` has finite parameters and a finite loss on the next batch."""
    next_loss, params_finite = run.check_state(state, data_iterator)
    if params_finite and np.isfinite(next_loss):
        return
    problem = f"gives a loss of {next_loss} on the next batch" if params_finite else "has non-finite parameters"
    raise NonFiniteLossError(
        f"The state at step {step} {problem}, so it was not saved. The run stopped; "
        f"{last_good_phrase(last_good_ckpt)}. {_DIVERGENCE_HINT}")


def _check_finite(window, first_step, last_good_ckpt):
    losses = np.array([float(m["loss"]) for m in window])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0]) + 1
        raise NonFiniteLossError(
            f"Loss became {losses[bad[0]]} at step {step} (between steps {first_step} and "
            f"{first_step + len(window)}). The run stopped; {last_good_phrase(last_good_ckpt)}. {_DIVERGENCE_HINT}")


def _log_window(writer, bar, window, step, seconds):
    means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
    means["steps_per_sec"] = len(window) / max(seconds, 1e-9)
    writer.write(step, {f"train/{k}" if k != "steps_per_sec" else k: v for k, v in means.items()})
    if bar is not None:
        bar.set_postfix(loss=f"{means['loss']:.4f}", steps_per_s=f"{means['steps_per_sec']:.2f}")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest good checkpoint) and returns final metrics.

    Before anything is written: the workdir must be writable, free (an exclusive lock), its metrics.jsonl
    readable and its checkpoint of the same run (config fields outside checkpoint.RESUMABLE_FIELDS equal).
    """
    workdir_lib.check_writable(workdir)
    with _Preemption() as preemption:
        run = Run(config)
        with workdir_lib.exclusive(workdir):
            return _train_in_locked_workdir(run, workdir, preemption)


def _start(run, workdir, data_iterator):
    """(step, state, metrics rows, saver) of a fresh or resumed run; refuses a workdir of another run."""
    rows = metrics.read_rows(workdir)
    manager = checkpoint.make_manager(workdir, run.config.keep_checkpoints)
    try:
        resume_step, state = checkpoint.restore_latest(manager, run.config, run.abstract_state, data_iterator)
    except BaseException:
        manager.close()
        raise
    if resume_step is None:
        state = run.init_state()
        if run.config.get("init_from"):
            state = warm_start.warm_start(state, run.config.init_from)
    return int(resume_step or 0), state, rows, checkpoint.Saver(manager, resume_step)


def _final_splits(config) -> tuple[tuple[str, str], ...]:
    """``(split, metrics prefix)`` of each evaluation at the end of a run, in order."""
    return (("validation", "eval/"),) + ((("test", "test/"),) if config.get("test_at_end") else ())


def _already_done(config, step, rows) -> bool:
    """True when the checkpoint is past total_steps, or at it with every final evaluation already written."""
    return step > config.total_steps or (step == config.total_steps and all(
        metrics.has_row(rows, step, prefix) for _, prefix in _final_splits(config)))


def _final_evaluations(run, writer, state, step, rows) -> dict:
    """The end-of-run metrics (``eval/...``, and ``test/...`` with config.test_at_end), each written as a row.

    A split whose row at ``step`` is already in metrics.jsonl (a run stopped between its validation and test
    evaluations, then run again) is read back from that row instead of being evaluated and written twice.
    """
    result = {}
    for split, prefix in _final_splits(run.config):
        written = {k: v for r in rows if r["step"] == step for k, v in r.items() if k.startswith(prefix)}
        if not written:
            written = {f"{prefix}{k}": v for k, v in run.evaluate(state, split).items()}
            writer.write(step, written)
        result.update(written)
    return result


def _train_in_locked_workdir(run, workdir, preemption) -> dict:
    config = run.config
    data_iterator = run.train_iterator()
    saver = None
    try:
        step, state, rows, saver = _start(run, workdir, data_iterator)
        if _already_done(config, step, rows):
            return {"already_at_step": step, "total_steps": config.total_steps}
        if preemption.requested:
            return {"stopped_before_training": preemption.requested, "step": step}
        if step:
            workdir_lib.say(f"Resuming from the checkpoint at step {step} in {workdir}.")
        metrics.keep_rows_through(workdir, step, rows)
        metrics.write_config(workdir, config)
        return _loop(run, workdir, preemption, data_iterator, saver, state, step, rows)
    finally:
        if saver is not None:
            saver.close()
        if hasattr(data_iterator, "close"):
            data_iterator.close()


def _loop(run, workdir, preemption, data_iterator, saver, state, step, rows) -> dict:
    """Train, evaluate and checkpoint from ``step`` to config.total_steps (or a stop signal); ``rows``: the
    metrics already written up to ``step``."""
    config = run.config
    writer = metrics.MetricWriter(workdir)
    is_chief = jax.process_index() == 0
    bar = tqdm.tqdm(total=config.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not is_chief)
    window, window_start, window_time = [], step, time.perf_counter()

    def flush():
        nonlocal window, window_start, window_time
        if window:
            _check_finite(window, window_start, saver.last_started)
            _log_window(writer, bar, window, step, time.perf_counter() - window_time)
        window, window_start, window_time = [], step, time.perf_counter()

    def save():
        flush()
        _check_saveable(run, state, data_iterator, step, saver.last_started)
        saver.save(state, data_iterator, config)

    try:
        while step < config.total_steps:
            state, step_metrics = run.step(state, next(data_iterator))
            step += 1
            window.append(step_metrics)
            bar.update(1)
            saver.poll()
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
                if saver.last_started != step:
                    save()
                saver.finish()
                logging.warning("%s: saved a checkpoint at step %d and stopped.", preemption.requested, step)
                return {"preempted_at_step": step, "signal": preemption.requested}
        if saver.last_started != step:
            save()
        flush()
        final = _final_evaluations(run, writer, state, step, rows)
        saver.finish()
    except metrics.MetricsWriteError as error:
        raise _stopped_by_write_error(error, saver) from error
    finally:
        bar.close()
        writer.close()
    return {"step": step, **final}


def _stopped_by_write_error(error, saver) -> metrics.MetricsWriteError:
    """``error`` completed with the last good checkpoint, once the save in flight (if any) has ended."""
    with contextlib.suppress(checkpoint.CheckpointSaveError):  # then the last good one is the one before
        saver.finish()
    return metrics.MetricsWriteError(f"{error} The run stopped; {last_good_phrase(saver.last_good)}. Free some "
                                     "space and run the same command to resume.")


def summary_line(result: dict) -> str:
    """The one line the command prints at the end of a run."""
    if "preempted_at_step" in result:
        what = "Ctrl-C (SIGINT)" if result.get("signal") == "SIGINT" else result.get("signal", "SIGTERM")
        return (f"Stopped by {what} at step {result['preempted_at_step']} after saving a checkpoint; "
                "run the same command again to resume.")
    if "stopped_before_training" in result:
        return (f"Stopped by {result['stopped_before_training']} during start-up, before training (at step "
                f"{result['step']}); nothing new was saved. Run the same command again to start.")
    if "already_at_step" in result:
        return (f"Nothing to train: the workdir's checkpoint is at step {result['already_at_step']} and "
                f"config.total_steps={result['total_steps']}; nothing was written. Pass a larger "
                "--config.total_steps to train on, or use a new --workdir.")
    line = f"Finished {result['step']} steps. Final validation loss {result['eval/loss']:.4f}"
    if "eval/majority_class_rate" in result:
        line += (f", accuracy {100 * result['eval/accuracy']:.2f}% "
                 f"(majority-class rate of this split: {100 * result['eval/majority_class_rate']:.2f}%)")
    else:
        line += f" ({result['eval/loss'] / np.log(2):.3f} bits per token)"
    if "test/accuracy" in result:
        line += f"; test accuracy {100 * result['test/accuracy']:.2f}%"
        if "test/majority_class_rate" in result:
            line += f" (majority-class rate {100 * result['test/majority_class_rate']:.2f}%)"
        else:
            line += f", test loss {result['test/loss']:.4f}"
    return line + "."

"""Fitness on a proxy task: a candidate's decoder LM trained on local bytes, scored by validation bits per byte
(Primer §1.5: LM1B perplexity after a fixed training budget; ``search.md`` §5.5 sizes it for a CPU).

``ProxyEvaluator`` is an ``effjax.search.space.Evaluator``: band by band (halving hurdles) it trains the model
the candidate's ``model_fields`` give with the ordinary trainer's pieces (``effjax.train.trainer.Run``), keeps
the train state and data position under the candidate's directory between bands (written atomically), and
reports validation bits per byte on a fixed set of batches. The budget is ``steps``, ``flops`` (XLA's cost
analysis of the train step: a costlier program gets fewer steps, deterministically) or ``seconds`` of training
after compilation (faithful to Primer, which rewarded net speed, and as noisy as the machine). Before band 0
every candidate is checked for future-token leakage: the logits at or before a position must not change when
later tokens do.
"""

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from effjax import files
from effjax.search import hurdles

BUDGETS = ("steps", "flops", "seconds")
# What a band can report as an objective (lower is better): the fitness, the training step's time after
# compilation, parameters, XLA's FLOPs per step (flops budget only) and decode state per token (NAS).
OBJECTIVES = ("bits_per_byte", "seconds_per_step", "params", "flops_per_step", "state_bytes_per_token")


class LeakError(ValueError):
    """A candidate's outputs depend on future tokens."""


@functools.lru_cache(maxsize=4)
def _sources(data_json: str):
    from effjax.train import trainer

    config = ml_collections.ConfigDict({"data": json.loads(data_json)})
    return trainer.data_sources(config)


def model_fields(space_kind: str, candidate_json: dict) -> dict:
    """The decoder-LM fields of a candidate of the program or NAS space."""
    if space_kind == "program":
        return {"program": candidate_json}
    if space_kind == "nas":
        from effjax.search import nas_space

        return nas_space.NasSpace().model_fields(nas_space.NasSpace().from_json(candidate_json))
    raise ValueError(f"Unknown space kind {space_kind!r}; known: program, nas.")


def initial_state(run, seed: int):
    """The run's initial train state, initialised op by op: the same values as ``run.init_state()``, but a
    long-lived worker reuses each op's compilation across candidates instead of compiling every model's init
    (0.7 s against 6 s per candidate, measured on a CPU core)."""
    from flax import linen as nn

    from effjax.train import state as state_lib

    sample = jnp.zeros((1, run.train_source.max_length), jnp.int32)
    with run._context():
        state = nn.meta.unbox(state_lib.make_init_fn(run.model, run.tx, sample)(seed))
    return jax.device_put(state, run.state_sharding)


def check_causal(model, params, length: int, vocab: int, position: int | None = None) -> None:
    """LeakError when changing tokens after ``position`` changes the logits at or before it (run op by op)."""
    position = length // 2 if position is None else position
    tokens = jax.random.randint(jax.random.key(0), (2, length), 1, vocab)
    changed = tokens.at[:, position + 1:].set((tokens[:, position + 1:] + 7) % (vocab - 1) + 1)
    apply = lambda t: model.apply({"params": params}, t)[:, :position + 1]  # noqa: E731
    if not np.allclose(apply(tokens), apply(changed), atol=1e-4, rtol=1e-4):
        raise LeakError(f"the model's outputs at positions <= {position} change with later tokens (it leaks the "
                        "future)")


def _flops_per_step(run, state, batch) -> float:
    """XLA's FLOPs of one train step, from the lowered HLO (no compilation needed)."""
    from effjax.train import sharding

    with run._context():
        cost = run.train_step.lower(state, sharding.global_batch(batch, run.batch_sharding)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis reports no FLOPs on this backend; use budget='steps' or 'seconds'.")
    return float(cost["flops"])


def use_compile_cache(directory: str) -> None:
    """XLA's persistent compilation cache in ``directory``: a candidate's later bands (and a resumed search)
    reuse its compiled init, train and eval steps (5-8 s per band on a CPU core, measured)."""
    if directory and jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class ProxyEvaluator:
    """``config``: the trainer config of the proxy task (plain dict); ``space_kind``: 'program' or 'nas';
    ``budget``/``total``: the full training budget (steps, FLOPs or seconds) split by ``num_hurdles`` halving
    hurdles; ``eval_batches``: the fixed validation batches of the fitness."""

    config: dict
    space_kind: str = "program"
    budget: str = "steps"
    total: float = 200
    num_hurdles: int = 2
    eval_batches: int = 8
    objectives: tuple = ("bits_per_byte",)
    context_length: int = 2048  # the reference context of state_bytes_per_token
    compile_cache: str = ""  # a directory for XLA's persistent compilation cache ('' off)

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ValueError(f"Unknown search budget {self.budget!r}; known: {', '.join(BUDGETS)}.")
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"Unknown search objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}.")

    def bands(self) -> int:
        return self.num_hurdles + 1

    def band_budget(self, band: int) -> float:
        if self.budget == "steps":
            return hurdles.band_steps(self.num_hurdles, int(self.total))[band]
        return hurdles.band_lengths(self.num_hurdles, self.total)[band]

    def make_run(self, candidate_json: dict, seed: int):
        from effjax.train import trainer

        config = ml_collections.ConfigDict(self.config)
        config.seed = seed
        config.eval_max_batches = self.eval_batches
        for key, value in model_fields(self.space_kind, candidate_json).items():
            if isinstance(value, dict):
                value = json.dumps(value)
            elif isinstance(value, tuple) and isinstance(config.model.get(key), str):
                value = ",".join(map(str, value))  # per-layer methods, as the command line spells them
            config.model[key] = value
        return trainer.Run(config, devices=jax.devices()[:1],
                           sources=_sources(json.dumps(self.config["data"], sort_keys=True)))

    def run_band(self, candidate_json: dict, band: int, candidate_dir: str, seed: int) -> dict:
        os.makedirs(candidate_dir, exist_ok=True)
        use_compile_cache(self.compile_cache)
        run = self.make_run(candidate_json, seed)
        iterator = run.train_iterator()
        saved = os.path.join(candidate_dir, "state.msgpack")
        if band == 0:
            state = initial_state(run, seed)
            check_causal(run.model, state.params, run.train_source.max_length, run.train_source.vocab_size)
        else:
            with open(saved, "rb") as f:
                restored = serialization.msgpack_restore(f.read())
            state = jax.device_put(serialization.from_state_dict(run.abstract_state, restored["state"]),
                                   run.state_sharding)
            iterator.set_state(json.loads(restored["data"]))
        start = time.perf_counter()
        state, info = self._train(run, state, iterator, self.band_budget(band))
        seconds = time.perf_counter() - start
        metrics = run.evaluate(state)
        bits = float(metrics["loss"]) / math.log(2.0)
        if not math.isfinite(bits):
            raise FloatingPointError(f"validation loss is {metrics['loss']} after band {band}")
        blob = {"state": serialization.to_state_dict(jax.device_get(state)),
                "data": json.dumps(iterator.get_state())}
        files.write_atomic(saved, serialization.msgpack_serialize(blob))
        params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        steps = info.pop("steps")
        cost = {"seconds": seconds, "steps": steps}
        if "flops_per_step" in info:
            cost["flops"] = steps * info["flops_per_step"]
        values = {"bits_per_byte": bits, "params": params, **info}
        if "state_bytes_per_token" in self.objectives:
            from effjax.search import costs

            fields = {**self.config["model"], **model_fields(self.space_kind, candidate_json)}
            values["state_bytes_per_token"] = costs.decode_state_bytes_per_token(fields, self.context_length)
        return {"objectives": {name: float(values[name]) for name in self.objectives}, "cost": cost,
                "info": values}

    def _train(self, run, state, iterator, budget):
        first = next(iterator)
        steps, flops = None, None
        if self.budget == "steps":
            steps = int(budget)
        elif self.budget == "flops":
            flops = _flops_per_step(run, state, first)
            steps = max(1, int(budget // flops))
        state, metrics = run.step(state, first)  # compiles
        jax.block_until_ready(metrics["loss"])
        done, start = 1, time.perf_counter()
        while (done < steps) if steps is not None else (time.perf_counter() - start < budget):
            state, metrics = run.step(state, next(iterator))
            done += 1
        loss = float(metrics["loss"])  # waits for the last step
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {done} of the band")
        info = {"steps": done, "seconds_per_step": elapsed / max(done - 1, 1)}
        if flops is not None:
            info["flops_per_step"] = flops
        return jax.block_until_ready(state), info

"""The search command and the proxy evaluator: a synthetic search from its config writes its results and
resumes, a journal of another search is refused untouched, bad settings fail in one line, a leaking model is
caught before it trains, and (slow) a real program search trains candidates band by band on the byte LM."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import ROOT, subprocess_env

from configs import search_nas_mixed, search_primer
from effjax.search import program as program_lib
from effjax.search import proxy, runner, seeds


def search_command(workdir, *overrides, config="configs/search_primer.py:synthetic"):
    return [sys.executable, "-m", "effjax.search", f"--config={config}", f"--workdir={workdir}", *overrides]


def test_a_synthetic_search_from_the_command_writes_results_and_refuses_another_search(tmp_path):
    out = subprocess.run(search_command(tmp_path, "--config.max_candidates=60"), cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "60 candidates. Best" in out.stdout
    assert {"journal.jsonl", "candidates.csv", "best.json", "best.txt", "fitness.png"} <= set(os.listdir(tmp_path))
    journal = (tmp_path / "journal.jsonl").read_bytes()
    other = subprocess.run(search_command(tmp_path, "--config.seed=1"), cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and "journal" in other.stderr
    assert (tmp_path / "journal.jsonl").read_bytes() == journal
    more = subprocess.run(search_command(tmp_path, "--config.max_candidates=80"), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert more.returncode == 0 and "80 candidates" in more.stdout  # resumed: 20 more, not a new search
    created = [json.loads(line) for line in open(tmp_path / "journal.jsonl") if '"created"' in line]
    assert [e["id"] for e in created] == list(range(len(created)))


def test_bad_search_settings_fail_in_one_line():
    config = search_primer.get_config()
    config.ray_address = "127.0.0.1:9"  # discard: nobody answers
    with pytest.raises(ValueError, match="(does not answer|Ray is not installed)") as err:
        runner.make_executor(config)
    assert "\n" not in str(err.value)
    config = search_primer.get_config()
    config.space = "graph"
    with pytest.raises(ValueError, match="Unknown search space 'graph'; known: program, nas"):
        runner.build(config)
    with pytest.raises(ValueError, match="Unknown search objective 'accuracy'"):
        proxy.ProxyEvaluator({}, objectives=("accuracy",))
    with pytest.raises(ValueError, match="Unknown search budget 'epochs'"):
        proxy.ProxyEvaluator({}, budget="epochs")
    assert search_nas_mixed.get_config().objectives.split(",")[0] == "bits_per_byte"
    with pytest.raises(ValueError, match="Unknown config arg"):
        search_primer.get_config("huge")


class _Model:
    """A stand-in decoder whose logits at each position read the sequence flipped: it sees the future."""

    def apply(self, variables, tokens):
        return jnp.flip(tokens, axis=1)[..., None].astype(jnp.float32)


def test_a_model_that_sees_the_future_is_caught_before_it_trains():
    with pytest.raises(proxy.LeakError, match="leaks the future"):
        proxy.check_causal(_Model(), {}, length=8, vocab=20)
    causal = type("Causal", (), {"apply": lambda self, v, t: jnp.cumsum(t, axis=1)[..., None] * 1.0})()
    proxy.check_causal(causal, {}, length=8, vocab=20)


def tiny_proxy(**overrides) -> dict:
    c = search_primer.get_config().proxy
    c.model.num_layers, c.model.embed_dim, c.model.num_heads, c.model.mlp_dim = 1, 32, 2, 128
    c.model.max_length = c.data.max_length = 32
    c.data.max_files = 20
    c.batch_size = c.eval_batch_size = 8
    c = ml_collections.ConfigDict(c.to_dict())
    c.update(overrides)
    return c.to_dict()


@pytest.mark.slow  # trains a program band by band; the default twins: the synthetic search above
def test_the_proxy_trains_a_program_band_by_band_on_a_flops_budget_and_resumes_from_its_state(tmp_path):
    evaluator = proxy.ProxyEvaluator(tiny_proxy(), budget="flops", total=3e9, num_hurdles=1, eval_batches=2,
                                     objectives=("bits_per_byte", "seconds_per_step"))
    program = program_lib.to_json(seeds.primer_ez(32, 2, 128))
    first = evaluator.run_band(program, 0, str(tmp_path), seed=0)
    flops = first["info"]["flops_per_step"]
    assert first["cost"]["steps"] == max(1, int(evaluator.band_budget(0) // flops))
    assert first["info"]["params"] > 0 and set(first["objectives"]) == {"bits_per_byte", "seconds_per_step"}
    saved = (tmp_path / "state.msgpack").read_bytes()
    second = evaluator.run_band(program, 1, str(tmp_path), seed=0)
    assert second["cost"]["steps"] == max(1, int(evaluator.band_budget(1) // flops))
    bits = [r["objectives"]["bits_per_byte"] for r in (first, second)]
    assert all(np.isfinite(bits)) and bits[1] < bits[0] < 8.5  # 8.5: uniform over 257 bytes
    # Band 1 rerun from the state band 0 saved (as after a crash during band 1) gives the same fitness.
    (tmp_path / "state.msgpack").write_bytes(saved)
    replay = evaluator.run_band(program, 1, str(tmp_path), seed=0)
    assert replay["objectives"]["bits_per_byte"] == pytest.approx(bits[1], abs=1e-5)


def test_the_search_config_programs_fit_the_proxy_model():
    config = search_primer.get_config()
    space, evaluator = runner.build(config)
    model = config.proxy.model
    seed = space.seeds()[0]
    assert program_lib.key(seed) == program_lib.key(seeds.vanilla(model.embed_dim, model.num_heads, model.mlp_dim))
    run = evaluator.make_run(program_lib.to_json(seed), seed=0)
    assert jax.tree.leaves(jax.eval_shape(run.model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32)))


def test_a_nas_genome_becomes_the_proxy_models_per_layer_attention():
    config = search_nas_mixed.get_config()
    space, evaluator = runner.build(config)
    genome = space.seeds()[0]
    genome = dataclasses.replace(genome, attention=("linear_elu",) + genome.attention[1:])
    run = evaluator.make_run(space.to_json(genome), seed=0)
    assert run.config.model.attention.split(",")[:2] == ["linear_elu", genome.attention[1]]
    assert [method for method, _ in run.model.layer_attention()][0] == "linear_elu"

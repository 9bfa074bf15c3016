"""Primer-EZ and full Primer against the Transformer on the byte-level LM, and what a program search found.

  python benchmarks/search_primer.py                               # curves: 3 seeds x 600 steps each
  python benchmarks/search_primer.py --steps=100 --seeds=1 --eval_every=50 --models=vanilla,primer
  python benchmarks/search_primer.py --journal=/tmp/search_primer  # + a search's candidates/hour and finds

(a) curves: the search's proxy model (``configs/search_common.py``: d 64, 2 layers, seq 64, batch 16) as the
built-in Transformer with ReLU (the search's seed, ``seeds.vanilla``), as Primer-EZ (squared ReLU + depthwise
convs after Q, K, V) and as full Primer (Primer-EZ with the shared Q/K depthwise representation, Primer's norm
and the feed-forward's norm on its output; ``configs/lm_bytes.py:primer``), trained for the same number of steps
with the same data and seeds through the ordinary trainer; validation bits per byte every ``--eval_every``
steps (``--models`` picks a subset). Primer's claim (So et al. 2021, Table 4: 1.7-2.3x at 35M on LM1B) is read as: the
steps a Primer needs to reach the vanilla model's final loss, divided into the vanilla steps (linear
interpolation between evaluations). Equal steps is not equal compute: the convs cost extra FLOPs per step, which
the table reports (XLA's cost analysis) so the ratio can be read at equal FLOPs too.

(b) with ``--journal``: candidates per hour of that search (finished + failed over the journal's wall span),
the best fitness against the seed's (and, with ``--references=N``, against the vanilla, Primer-EZ and Primer
programs trained by the search's evaluator at its full budget, N seeds each), and the first candidate (if any)
whose live program contains squared ReLU (``square`` of a ``relu``) or a depthwise conv of a projection that
feeds attention (``effjax.search.program_space.primer_finds``).

Writes ``benchmarks/results/search_primer.{json,png}`` (``--out``).
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


MODELS = ("vanilla", "primer_ez", "primer")


def model_config(name: str):
    """The search's proxy task with the built-in model ``name``: the Transformer with ReLU (the search's seed), or
    ``configs/lm_bytes.py``'s ``primer_ez`` / ``primer`` model fields."""
    from configs import lm_bytes, search_common

    config = search_common.proxy_task()
    config.model.activation = "relu"
    if name != "vanilla":
        variant = lm_bytes.get_config(name).model
        for field in ("attention", "attention_params", "activation", "norm", "norm_layout"):
            config.model[field] = variant[field]
    return config


def curves(models, steps: int, seeds: int, eval_every: int, eval_batches: int) -> dict:
    import jax

    from effjax.search import proxy
    from effjax.train import trainer

    out = {}
    for name in models:
        out[name] = []
        for seed in range(seeds):
            config = model_config(name)
            config.seed, config.eval_max_batches = seed, eval_batches
            data = json.dumps(config.data.to_dict(), sort_keys=True)
            run = trainer.Run(config, devices=jax.devices()[:1], sources=proxy._sources(data))
            state, iterator = proxy.initial_state(run, seed), run.train_iterator()
            flops = proxy._flops_per_step(run, state, next(run.train_iterator()))
            points, start = [], time.perf_counter()
            for step in range(1, steps + 1):
                state, _ = run.step(state, next(iterator))
                if step % eval_every == 0 or step == steps:
                    bits = float(run.evaluate(state)["loss"]) / math.log(2.0)
                    points.append((step, bits))
                    print(f"{name} seed {seed} step {step}: {bits:.4f} bits/byte", flush=True)
            jax.block_until_ready(state.params)
            out[name].append({"seed": seed, "points": points, "flops_per_step": flops,
                              "seconds": time.perf_counter() - start})
    return out


def steps_to_reach(points, target: float) -> float | None:
    """The first step (interpolated) at which the curve reaches ``target`` bits per byte, or None."""
    previous = None
    for step, bits in points:
        if bits <= target:
            if previous is None:
                return float(step)
            (s0, b0) = previous
            return s0 + (step - s0) * (b0 - target) / (b0 - bits)
        previous = (step, bits)
    return None


def summarise(runs: dict) -> dict:
    rows = {}
    for name, seeds in runs.items():
        finals = [r["points"][-1][1] for r in seeds]
        rows[name] = {"final_bits_mean": sum(finals) / len(finals), "finals": finals,
                      "flops_per_step": seeds[0]["flops_per_step"]}
    rows["speedup_steps"], rows["speedup_flops"] = {}, {}
    for name in (n for n in runs if n != "vanilla"):
        ratios = []
        for vanilla, run in zip(runs["vanilla"], runs[name], strict=True):
            target, steps = vanilla["points"][-1][1], vanilla["points"][-1][0]
            reached = steps_to_reach(run["points"], target)
            ratios.append(None if reached is None else steps / reached)
        rows["speedup_steps"][name] = ratios
        flop_ratio = rows[name]["flops_per_step"] / rows["vanilla"]["flops_per_step"]
        rows["speedup_flops"][name] = [None if r is None else r / flop_ratio for r in ratios]
    return rows


def search_report(workdir: str) -> dict:
    from effjax.search import program as program_lib
    from effjax.search import program_space, results

    names, rows = results.records(workdir)
    done = [r for r in rows if r["status"] != "in flight"]
    events = [json.loads(line) for line in open(os.path.join(workdir, "journal.jsonl")) if line.strip()][1:]
    stamps = [e["time"] for e in events if "time" in e]
    span = (max(stamps) - min(stamps)) if len(stamps) > 1 else None
    found = {"squared_relu": None, "dconv_after_projection": None}
    for r in done:
        if r["fitness"] is None:
            continue
        for name, present in program_space.primer_finds(program_lib.from_json(r["candidate"])).items():
            if present and found[name] is None:
                found[name] = r["id"]
    seed = next((r for r in rows if r["id"] == 0), None)
    best = results.best_of(rows)
    return {"candidates": len(done), "span_seconds": span,
            "candidates_per_hour": None if not span else 3600 * len(done) / span,
            "seed_fitness": seed and seed["fitness"], "best_fitness": best and best["fitness"],
            "best_id": best and best["id"], "first_found": found}


def reference_fitness(workdir: str, seeds: int) -> dict:
    """Bits per byte of the vanilla, Primer-EZ and full Primer programs (``effjax.search.seeds``) trained by the
    search's own evaluator at its full budget (every band), ``seeds`` training seeds each: the yardstick for
    the search's best candidate at the same training budget."""
    import tempfile

    import ml_collections

    from effjax.search import program as program_lib
    from effjax.search import runner
    from effjax.search import seeds as seed_programs

    with open(os.path.join(workdir, "journal.jsonl")) as f:
        header = json.loads(f.readline())
    config = ml_collections.ConfigDict(header["config"]["config"])
    _, evaluator = runner.build(config)
    model = config.proxy.model
    out = {}
    for name in MODELS:
        program = getattr(seed_programs, name)(model.embed_dim, model.num_heads, model.mlp_dim)
        finals = []
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as scratch:
                for band in range(evaluator.bands()):
                    result = evaluator.run_band(program_lib.to_json(program), band, scratch, seed)
            finals.append(result["objectives"]["bits_per_byte"])
            print(f"reference {name} seed {seed}: {finals[-1]:.4f} bits/byte", flush=True)
        out[name] = {"finals": finals, "mean": sum(finals) / len(finals)}
    return out


def plot(runs: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = dict(zip(MODELS, ("tab:blue", "tab:red", "tab:green"), strict=True))
    for name, seeds in runs.items():
        for i, r in enumerate(seeds):
            steps, bits = zip(*r["points"], strict=True)
            ax.plot(steps, bits, color=colors[name], alpha=0.7, label=name if i == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--journal", default="", help="a search workdir to report on")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "search_primer"))
    parser.add_argument("--search_only", action="store_true", help="only the --journal report (no curves)")
    parser.add_argument("--references", type=int, default=0,
                        help="with --journal: train the vanilla/Primer-EZ/Primer programs at the search's budget "
                             "with this many seeds")
    args = parser.parse_args(argv)
    if args.search_only:
        report = search_report(args.journal)
        if args.references:
            report["references"] = reference_fitness(args.journal, args.references)
        print(json.dumps(report))
        return
    models = args.models.split(",")
    if "vanilla" not in models or not set(models) <= set(MODELS):
        parser.error(f"--models must include vanilla (the reference) and name only {', '.join(MODELS)}.")
    runs = curves(models, args.steps, args.seeds, args.eval_every, args.eval_batches)
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "steps": args.steps, "seeds": args.seeds, "runs": runs,
              "summary": summarise(runs)}
    if args.journal:
        report["search"] = search_report(args.journal)
        if args.references:
            report["search"]["references"] = reference_fitness(args.journal, args.references)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(runs, args.out + ".png")
    summary = report["summary"]
    print("final bits/byte: " + ", ".join(f"{name} {summary[name]['final_bits_mean']:.4f}" for name in runs))
    for name, ratios in summary["speedup_steps"].items():
        print(f"steps to the vanilla final loss, vanilla / {name} per seed: {ratios}; at equal FLOPs: "
              f"{summary['speedup_flops'][name]}")
    if args.journal:
        print(f"search: {json.dumps(report['search'])}")


if __name__ == "__main__":
    main()

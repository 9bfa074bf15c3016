"""A search from its config (``configs/search_*.py``): the space, the evaluator, the executor, then the engine.

The journal's fingerprint is the config without the fields that only say how long or on how many workers
to run (``max_candidates``, ``max_wall_seconds``, ``workers``, ``timeout``, ``ray_address``), so a stopped search
resumes with more candidates, time or machines; any other change is refused (a journal is never overwritten by
another search). The engine adds its own settings, among them how many candidates are in flight.
"""

import os

from effjax.search import evolution, executors, program_space, proxy, results, synthetic

RUNTIME_FIELDS = ("max_candidates", "max_wall_seconds", "workers", "timeout", "ray_address")


def build(config, workdir: str = ""):
    """``(space, evaluator)`` of a search config (compilations cached under ``workdir/xla_cache``)."""
    if config.preset == "synthetic":
        return synthetic.DigitSpace(), synthetic.DigitEvaluator()
    objectives = tuple(filter(None, config.objectives.split(",")))
    model = config.proxy.model
    if config.space == "program":
        space = program_space.make(config.preset, embed_dim=model.embed_dim, num_heads=model.num_heads,
                                   mlp_dim=model.mlp_dim)
    elif config.space == "nas":
        from effjax.search import nas_space

        space = nas_space.NasSpace()
    else:
        raise ValueError(f"Unknown search space {config.space!r}; known: program, nas.")
    evaluator = proxy.ProxyEvaluator(config.proxy.to_dict(), space_kind=config.space, budget=config.budget,
                                     total=config.total, num_hurdles=config.hurdles,
                                     eval_batches=config.eval_batches, objectives=objectives,
                                     compile_cache=os.path.join(os.path.abspath(workdir), "xla_cache") if workdir
                                     else "")
    return space, evaluator


def make_executor(config):
    """Ray tasks when ``config.ray_address`` is set ('local' or a cluster address), else spawned local processes
    (``config.workers``; 0: in this process)."""
    if config.ray_address:
        from effjax.search.ray_executor import RayExecutor

        env = None if config.preset == "synthetic" else executors.SINGLE_THREAD_ENV
        return RayExecutor(config.ray_address, max(config.workers, 1), timeout=config.timeout or None, env=env)
    if config.preset == "synthetic" or config.workers <= 0:
        return executors.InlineExecutor()
    return executors.ProcessExecutor(config.workers, timeout=config.timeout or None,
                                      env=executors.SINGLE_THREAD_ENV)


def search(config, workdir: str, progress: bool = True):
    """Runs or resumes the search of ``config`` in ``workdir``; writes the readable outputs; returns the result."""
    space, evaluator = build(config, workdir)
    objectives = ("fitness",) if config.preset == "synthetic" else evaluator.objectives
    fingerprint = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    executor = make_executor(config)
    try:
        result = evolution.run_search(
            space, evaluator, workdir=workdir, fingerprint=fingerprint, max_candidates=config.max_candidates,
            population=config.population, tournament=config.tournament, seed=config.seed, executor=executor,
            min_history=config.min_history, objectives=objectives,
            max_wall_seconds=config.max_wall_seconds or None, progress=progress)
    finally:
        executor.close()
    results.write_outputs(workdir, space)
    return space, result

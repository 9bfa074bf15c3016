"""Settings shared by the architecture-search configs (``search_primer.py``, ``search_nas_mixed.py``).

Presets (the config arg): ``rediscovery`` (default; a CPU search of about 10 minutes on 2 cores),
``full`` (Primer's whole space and sizes for accelerators) and ``synthetic`` (a sub-second digit space for
tests, no training).
"""

import ml_collections

from configs import common, lm_bytes


def proxy_task() -> ml_collections.ConfigDict:
    """The byte-level LM every candidate trains on (``search.md`` §5.5: seq 64, d 64, 2 layers, batch 16)."""
    c = lm_bytes.get_config()
    c.model.num_layers, c.model.embed_dim, c.model.num_heads, c.model.mlp_dim = 2, 64, 4, 256
    c.model.max_length = c.data.max_length = 64
    c.data.max_files = 300
    c.batch_size = c.eval_batch_size = 16
    c.learning_rate, c.schedule, c.warmup_steps, c.weight_decay = 3e-3, "constant", 20, 0.0
    return c


def base(space: str, arg=None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, rediscovery=False, full=False, synthetic=False)
    c = ml_collections.ConfigDict()
    c.space = space               # 'program' (Primer-style programs) or 'nas' (per-layer attention genomes)
    c.preset = "full" if args.full else "synthetic" if args.synthetic else "rediscovery"
    c.seed = 0                    # every evolution decision derives from (seed, candidate id): reruns match
    c.population = 24             # regularized evolution's population (Primer: 100)
    c.tournament = 6              # tournament size (Primer: 10)
    c.max_candidates = 1000       # stop after this many finished or failed candidates...
    c.max_wall_seconds = 600.0    # ...or this long (0: no limit); rerunning the command resumes either way
    c.workers = 2                 # evaluation processes (spawned, one single-threaded XLA each)
    c.timeout = 600.0             # seconds one band may take before its candidate fails
    c.min_history = 8             # a hurdle passes everyone until this many candidates reached it
    c.objectives = "bits_per_byte"  # comma-separated, lower is better; several = Pareto (NSGA-II) selection
    c.budget = "flops"            # 'flops' (XLA cost analysis, deterministic), 'seconds' (Primer) or 'steps'
    c.total = 3.0e11              # full training budget of one candidate in that unit (360 steps of the seed)
    c.hurdles = 2                 # halving hurdles (Primer: 4)
    c.eval_batches = 8            # fixed validation batches of the fitness (bits per byte)
    c.ray_address = ""            # '' local processes; 'local' a Ray instance here; 'host:port' a Ray cluster
    c.proxy = proxy_task()
    if c.preset == "full":
        c.population, c.tournament, c.hurdles = 100, 10, 4
        c.max_candidates, c.max_wall_seconds = 25_000, 0.0
        c.proxy.model.embed_dim, c.proxy.model.num_layers, c.proxy.model.num_heads = 512, 6, 8
        c.proxy.model.mlp_dim = 2048
        c.budget, c.total = "seconds", 25_200.0
    if c.preset == "synthetic":
        c.population, c.tournament, c.max_candidates, c.max_wall_seconds = 20, 5, 200, 0.0
        c.workers, c.min_history, c.objectives = 1, 5, "fitness"
    return c

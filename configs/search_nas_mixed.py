"""NAS over mixed attention: per-layer attention methods from the zoo, widths, MLP ratio and MASFormer-style
full-attention layers, selected by Pareto rank over validation bits per byte, step time and decode state.

  python -m effjax.search --config=configs/search_nas_mixed.py --workdir=/tmp/search_nas

Writes DIR/journal.jsonl, candidates.csv, front.csv (the Pareto front), best.json and plots; rerun to resume.
"""

from configs import search_common


def get_config(arg=None):
    c = search_common.base("nas", arg)
    if c.preset != "synthetic":
        c.objectives = "bits_per_byte,seconds_per_step,state_bytes_per_token"
        c.budget, c.total = "steps", 300
    return c

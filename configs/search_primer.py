"""Primer-style program search (So et al. 2021): the decoder block as a program, evolved from the Transformer.

  python -m effjax.search --config=configs/search_primer.py --workdir=/tmp/search_primer
  python -m effjax.search --config=configs/search_primer.py:full --workdir=DIR      # Primer's space, accelerators
  python -m effjax.main --config=configs/lm_bytes.py --workdir=/tmp/best --config.model.program=DIR/best.json

The default (``rediscovery``) edits only the head and feed-forward subprograms with 9 ops, mostly by inserts
spliced onto the dataflow, so squared ReLU or the depthwise conv after a projection is one mutation away (about
1 child in 28); it runs 10 minutes on 2 CPU cores and writes DIR/journal.jsonl, candidates.csv, best.json,
best.txt and fitness.png. Rerun the same command to resume.
"""

from configs import search_common


def get_config(arg=None):
    return search_common.base("program", arg)

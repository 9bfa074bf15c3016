"""Runs an architecture search from a config; rerunning the same command resumes it.

  python -m effjax.search --config=configs/search_primer.py --workdir=/tmp/search_primer
  python -m effjax.search --config=configs/search_nas_mixed.py --workdir=/tmp/search_nas --config.workers=4
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a search config (file.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the journal and the results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from effjax.search import runner

    try:
        space, result = runner.search(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as error:
        sys.exit(f"effjax.search: {type(error).__name__}: {error}")
    done = len(result.history)
    if result.stopped and result.stopped.startswith("seed failed"):
        sys.exit(f"effjax.search: the search stopped because its {result.stopped}; nothing can evolve from it. "
                 "Check the proxy settings (config.proxy) and the space.")
    if result.stopped:
        print(f"Stopped ({result.stopped}) after {done} candidates; rerun the same command to resume.")
    best = result.best
    if best is None:
        print(f"No candidate finished ({done} done); see {os.path.join(_WORKDIR.value, 'candidates.csv')}.")
        return
    print(f"{done} candidates. Best {best.get('fitness')} (id {best['id']}):")
    print(space.describe(space.from_json(best["candidate"])))
    if _CONFIG.value.space == "program" and _CONFIG.value.preset != "synthetic":
        print("Train it at full size: python -m effjax.main --config=configs/lm_bytes.py --workdir=DIR "
              f"--config.model.program={os.path.join(_WORKDIR.value, 'best.json')}")


if __name__ == "__main__":
    app.run(main)

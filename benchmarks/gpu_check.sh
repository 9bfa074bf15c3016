#!/usr/bin/env bash
# The one-command GPU check (BENCHMARKS.md, "GPU work owed"): on a machine with one GPU and no internet, it
#   1. installs the pure-Python packages the image lacks from the wheels in .gpu_wheels/ (benchmarks/gpu_wheels.sh
#      downloads them; carried along) into /tmp/gpu_site, and makes effjax.kernels importable from this checkout
#      without installing effjax (a sitecustomize on PYTHONPATH adds kernels/ to the effjax package's path);
#   2. runs the kernel correctness tests with compiled kernels (interpret=False, the default on a GPU): the GPU
#      tests first (tests/test_kernels_flash.py -k gpu, tests/test_kernels_gpu_backends.py -m gpu: cuDNN, Mosaic
#      GPU, tokamax and Triton against the reference), then the default tier of the other kernel test files;
#   3. runs benchmarks/kernel_speed.py: every dense-attention backend side by side (xla, cudnn, mosaic_gpu,
#      flash = Triton, tokamax, pallas_mha; each skipped with its supports reason), bidirectional and causal,
#      forward and forward+backward, batch 4, 16 heads, head_dim 64/128, 1K-32K (4K and 16K first), bf16;
#      linear attention against flash; block-sparse at 10% and 25% density; whatever the budget leaves out is
#      listed as "skipped: time budget" (rerun those with --lengths);
#   4. runs benchmarks/token_reduction.py --batch=256,32 --sections=speed for ToMe on ViT-B/16 (the owed target)
#      if it fits.
# Everything goes into one folder (at most 8 files, for the device tool): gpu_check.log, summary.md,
# kernels.{jsonl,md,png}, token_reduction.{json,png}. A time guard ends the whole script inside 9 minutes
# (GPU_CHECK_BUDGET seconds, default 540): each step gets what is left minus what the later steps need, the
# benchmark stops starting new sizes at its budget, and a step that no longer fits is skipped; summary.md says so.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # on the GPU machine (OUT_DIR defaults to $OUT)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    # on a CPU: interpreted kernels, tiny sizes (the slow test)
#
# The device-tool call (one call; OUT is set there):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=600)
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
DEST="${1:-${OUT:-}}"
if [[ -z "$DEST" ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR (or set OUT)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
LOG="$DEST/gpu_check.log"
SUMMARY="$DEST/summary.md"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-540}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
: >"$LOG"

left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "$*" | tee -a "$LOG"; }
note() { echo "$*" >>"$SUMMARY"; say "$*"; }

# step NAME CAP RESERVE CMD...: runs CMD with a timeout of min(CAP, time left - RESERVE) seconds, or skips it when
# under 20 s would be left; the outcome (exit code, seconds) goes into summary.md.
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local avail=$(($(left) - reserve))
  local limit=$((avail < cap ? avail : cap))
  if ((limit < 20)); then
    note "- $name: **skipped**, $(left) s of the ${BUDGET} s budget left (the later steps keep ${reserve} s)"
    return 0
  fi
  say ""
  say "=== $name (limit ${limit} s, $(left) s left) ==="
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  case $rc in
    0) note "- $name: ok (${took} s)" ;;
    124 | 137) note "- $name: **stopped by the time guard** after ${took} s (limit ${limit} s)" ;;
    *) note "- $name: **exit code $rc** (${took} s)" ;;
  esac
  return 0
}

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Mode: $([[ $DRY == 1 ]] && echo 'dry run (CPU, interpreted kernels, tiny sizes)' || echo 'GPU'); budget ${BUDGET} s."
  echo
} >"$SUMMARY"

# 1. Packages: carried wheels, and effjax.kernels importable from this checkout.
SITE="${GPU_CHECK_SITE:-/tmp/gpu_site}"
mkdir -p "$SITE"
if compgen -G ".gpu_wheels/*.whl" >/dev/null && [[ $DRY == 0 ]]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu_wheels/*.whl >>"$LOG" 2>&1; then
    note "- wheels: installed $(ls .gpu_wheels/*.whl | wc -l) from .gpu_wheels into $SITE"
  else
    note "- wheels: **pip install failed** (see gpu_check.log)"
  fi
else
  note "- wheels: none installed ($([[ $DRY == 1 ]] && echo 'dry run' || echo 'no .gpu_wheels/*.whl: run benchmarks/gpu_wheels.sh here and carry .gpu_wheels'))"
fi
# effjax.kernels is the folder kernels/ (setup.py's package_dir); without installing effjax, add that folder to
# the effjax package's path at interpreter start, in every process (pytest, the benchmarks' subprocesses).
cat >"$SITE/sitecustomize.py" <<EOF
"""gpu_check.sh: effjax.kernels = $ROOT/kernels without installing effjax (setup.py's package_dir)."""
try:
    import effjax

    if "$ROOT" not in effjax.__path__:
        effjax.__path__.append("$ROOT")
except ImportError:
    pass
EOF
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ $DRY == 1 ]]; then
  export JAX_PLATFORMS=cpu
fi
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, jax
print("python", __import__("sys").version.split()[0], "jax", jax.__version__, "backend", jax.default_backend(),
      jax.devices()[0].device_kind)
for name in ("effjax.kernels.flash_attention", "effjax.kernels.gpu_cudnn", "effjax.kernels.gpu_mosaic",
             "effjax.kernels.gpu_tokamax", "flax", "optax", "orbax.checkpoint", "matplotlib", "tokamax"):
    try:
        importlib.import_module(name)
        print("import ok:", name)
    except Exception as error:
        print("import FAILED:", name, type(error).__name__, error)
EOF
grep -E "^(python|import FAILED)" "$LOG" | sed 's/^/- /' >>"$SUMMARY"

# 2. Correctness with compiled kernels (on a GPU interpret_default() is False, so every kernel test compiles).
TIMEOUT_OPT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_OPT=(--timeout=120); fi
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider "${TIMEOUT_OPT[@]}")
if [[ $DRY == 1 ]]; then
  step "tests: GPU tests" 120 40 "${PYTEST[@]}" tests/test_kernels_gpu_backends.py -m gpu
else
  # Minimum kept for the later steps: 60 s other tests, 150 s speed, 60 s token reduction.
  step "tests: GPU tests (flash -k gpu, the backends file)" 120 270 "${PYTEST[@]}" \
    tests/test_kernels_flash.py tests/test_kernels_gpu_backends.py -k "gpu"
  step "tests: kernel test files, default tier" 120 210 "${PYTEST[@]}" tests/test_kernels_flash.py \
    tests/test_kernels_block_sparse.py tests/test_kernels_dropout.py tests/test_kernels_linear.py \
    tests/test_kernels_scan.py tests/test_kernels_methods_grouped_linear.py tests/test_kernels_delta.py -k "not gpu"
fi

# 3. Kernel speed: its own budget stops new sizes early; the timeout is the backstop.
if [[ $DRY == 1 ]]; then
  BENCH=(--small --lengths=32,64 --head_dims=16 --repeats=1 --patterns=bidirectional,causal --budget=0.5
         --impls=cudnn,mosaic_gpu,tokamax,flash,xla)
  RESERVE=30
else
  # The most telling sizes first: the budget skips the last ones (all of them would take over 20 minutes).
  BENCH=(--patterns=bidirectional,causal --repeats=3 --lengths=4096,16384,1024,32768,8192,2048)
  RESERVE=60
fi
SPEED_BUDGET=$(($(left) - RESERVE - 45))
((SPEED_BUDGET < 1)) && SPEED_BUDGET=1
[[ $DRY == 1 ]] || BENCH+=(--budget="$SPEED_BUDGET")
step "kernel_speed.py" 400 "$RESERVE" "$PY" benchmarks/kernel_speed.py "${BENCH[@]}" --out="$DEST/kernels"
if [[ -f "$DEST/kernels.jsonl" ]]; then
  "$PY" - "$DEST/kernels.jsonl" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
count = collections.Counter(r["status"].split(":")[0] for r in rows)
print(f"  - kernel_speed rows: {len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(count.items()))})")
reasons = sorted({(r["impl"], r["status"]) for r in rows if r["status"].startswith("refused")})
for impl, status in reasons[:20]:
    print(f"  - `{impl}` {status}")
EOF
fi

# 4. Token reduction speed (ToMe on ViT-B/16 and DeiT-S at batch 256 and 32), if time is left.
if [[ $DRY == 1 ]]; then
  TOKENS=(--tiny --sections=speed --methods=tome --repeats=1)
else
  TOKENS=(--batch=256,32 --sections=speed --methods=tome --models=vit_b16)  # the owed target; the rest: --update
fi
step "token_reduction.py (ToMe speed)" 150 5 "$PY" benchmarks/token_reduction.py "${TOKENS[@]}" \
  --out="$DEST/token_reduction"

note ""
note "Total $(($(date +%s) - START)) s of the ${BUDGET} s budget."
echo
cat "$SUMMARY"
exit 0

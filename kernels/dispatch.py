"""One dispatch from an attention method's kernel call to a backend, with fallback in order.

The ops are the kernel entry points: ``attention`` (dense softmax with key padding, segments, causal, window),
``block_sparse`` (listed key blocks), ``window_global`` (Longformer), ``linear`` (chunked linear attention),
``scan`` (Mamba's selective scan) and ``delta`` (the chunked (gated) delta rule). A method builds the op's keyword
arguments (``call``) and its own XLA path (``xla``, a thunk) and asks ``run(op, impl, call, xla=..., where=NAME)``.
``impl`` is

- ``"xla"``: the method's plain-JAX path;
- a backend name (``BACKENDS``): ``"triton"`` (effjax's kernels through Triton; interpreted on a CPU),
  ``"mosaic_tpu"`` (splash attention and effjax's Mosaic kernels; TPU interpret mode on a CPU), ``"cudnn"``,
  ``"mosaic_gpu"`` (Hopper), ``"tokamax"`` (when installed);
- ``"pallas"``: the platform's own Pallas backend (Triton on GPUs and CPUs, Mosaic on TPUs);
- an ordered list (a tuple or a comma-separated string, e.g. ``"cudnn,triton,xla"``) tried in turn: a backend
  that cannot run the call (platform, shape, dtype or feature) gives its reason and the next is tried;
- ``"auto"``: the order of ``AUTO_TABLE`` for this platform, op and length, always ending in XLA. On a CPU it
  is XLA. On GPUs and TPUs the table holds only orders measured on that hardware (``kernels/auto_table.json``,
  written from the benchmark); an op with no measured entry runs XLA, which is always correct.

Without a backend left, the error is one line naming each backend's reason and the options. Every choice is
logged once per (method, op, backend) and kept for ``choices()``.
"""

import dataclasses
import importlib
import json
import logging
import os

import jax

OPS = ("attention", "block_sparse", "window_global", "linear", "scan", "delta")
# backend name -> the modules (in this package) that implement its ops
BACKENDS = {
    "triton": ("triton_backend",),
    "mosaic_tpu": ("tpu_attention", "tpu_linear", "tpu_scan", "tpu_delta"),
    "cudnn": ("gpu_cudnn",),
    "mosaic_gpu": ("gpu_mosaic",),
    "tokamax": ("gpu_tokamax",),
}
PALLAS = {"gpu": "triton", "cpu": "triton", "tpu": "mosaic_tpu"}
SPECIAL = ("xla", "pallas", "auto")
AUTO_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend that ran ``op`` for a method, and why each backend before it was passed over."""

    op: str
    backend: str
    skipped: tuple = ()  # ((backend, reason), ...)


class NoBackendError(ValueError, NotImplementedError):
    """No backend in ``impl`` can run the call (a ValueError, and a NotImplementedError for the features)."""


_choices: dict[str, Choice] = {}
_logged: set = set()


def options() -> str:
    return ", ".join(SPECIAL + tuple(BACKENDS))


def parse(impl) -> tuple[str, ...]:
    """The names in ``impl`` (a name, a comma-separated string or a sequence); ValueError for an unknown one."""
    names = tuple(n.strip() for n in impl.split(",")) if isinstance(impl, str) else tuple(impl)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"impl must be a backend name or a list of them ({options()}), got {impl!r}.")
    for name in names:
        if name not in SPECIAL and name not in BACKENDS:
            raise ValueError(f"Unknown kernel backend {name!r} in impl={impl!r}; known: {options()} (a comma-"
                             "separated list is tried in order).")
    return names


def spec(impl) -> str:
    return impl if isinstance(impl, str) else ",".join(impl)


def load_auto_table(path: str = AUTO_TABLE_PATH) -> dict:
    """``{platform: {op: [{"min_length": n, "order": [backend, ...]}, ...]}}`` measured on hardware, or {}."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


AUTO_TABLE = load_auto_table()


# benchmarks/kernel_speed.py's implementation names -> (op, backend)
MEASURED = {"flash": ("attention", "triton"), "cudnn": ("attention", "cudnn"),
            "mosaic_gpu": ("attention", "mosaic_gpu"), "tokamax": ("attention", "tokamax"), "xla": ("attention", "xla"),
            "linear_chunked": ("linear", "triton"), "linear_xla": ("linear", "xla")}


def table_from_measurements(rows, platform: str) -> dict:
    """An ``AUTO_TABLE`` for ``platform`` from ``benchmarks/kernel_speed.py`` rows: per op and length, the backends
    that ran every measured shape and pattern of that length (forward + backward), fastest first by their summed
    time, cut at XLA (a backend slower than XLA is not tried). Lengths whose order equals the previous one's are
    merged, so each entry holds from its ``min_length`` up."""
    totals, shapes = {}, {}
    for r in rows:
        if r.get("pass") != "fwd+bwd" or r.get("impl") not in MEASURED:
            continue
        op, backend = MEASURED[r["impl"]]
        shape = (r["head_dim"], r.get("causal", False))
        shapes.setdefault((op, r["length"]), set()).add(shape)
        entry = totals.setdefault((op, r["length"], backend), {})
        entry[shape] = r["seconds"] if r.get("status") == "ok" else None
    table = {}
    for (op, length), needed in sorted(shapes.items()):
        timed = {backend: sum(t.values()) for (o, n, backend), t in totals.items()
                 if o == op and n == length and set(t) == needed and None not in t.values()}
        order = sorted(timed, key=timed.get)
        order = order[:order.index("xla")] if "xla" in order else order
        rows_of_op = table.setdefault(op, [])
        if not rows_of_op or rows_of_op[-1]["order"] != order + ["xla"]:
            rows_of_op.append({"min_length": length, "order": order + ["xla"]})
    return {platform: table}


def auto_order(op: str, length: int, platform: str, table: dict | None = None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` at sequence ``length`` on ``platform``, ending in XLA."""
    rows = (AUTO_TABLE if table is None else table).get(platform, {}).get(op, [])
    order = ()
    for row in sorted(rows, key=lambda r: r["min_length"]):
        if length >= row["min_length"]:
            order = tuple(row["order"])
    return tuple(n for n in order if n != "xla") + ("xla",)


def expand(impl, op: str, length: int, platform: str | None = None) -> tuple[str, ...]:
    """``impl`` as the backends to try in order (``pallas`` and ``auto`` resolved for the platform)."""
    platform = platform or jax.default_backend()
    out = []
    for name in parse(impl):
        names = {"pallas": (PALLAS.get(platform, "triton"),), "auto": auto_order(op, length, platform)}.get(
            name, (name,))
        out.extend(n for n in names if n not in out)
    return tuple(out)


def backend_op(name: str, op: str, call: dict):
    """``(function, reason)``: the backend's ``op`` and why it cannot run ``call`` (None: it can)."""
    for module_name in BACKENDS[name]:
        try:
            module = importlib.import_module(f"effjax.kernels.{module_name}")
        except ImportError as error:
            return None, f"not available ({error})"
        if op in module.OPS:
            return module.OPS[op], module.supports(op, call)
    return None, f"no {op} kernel"


def _length(call: dict) -> int:
    for name in ("k", "phi_k", "x"):
        if call.get(name) is not None:
            return int(call[name].shape[1])
    return 0


def choose(op: str, impl, call: dict, *, where: str, refuse: str | None = None):
    """``(Choice, function or None for XLA)`` for ``call``; ``refuse`` is a reason no kernel can take the call
    (an input the kernel ops do not have, e.g. an arbitrary pair mask)."""
    if op not in OPS:
        raise ValueError(f"{where}: unknown kernel op {op!r}; known: {', '.join(OPS)}.")
    skipped = []
    for name in expand(impl, op, _length(call)):
        if name == "xla":
            return _record(where, Choice(op, "xla", tuple(skipped))), None
        fn, reason = (None, refuse) if refuse else backend_op(name, op, call)
        if reason is None:
            return _record(where, Choice(op, name, tuple(skipped))), fn
        skipped.append((name, reason))
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    raise NoBackendError(f"{where}: no backend in impl={spec(impl)!r} can run this {op} call ({why}); add xla to fall "
                     f"back (impl='{spec(impl)},xla') or use impl='auto' (options: {options()}).")


def run(op: str, impl, call: dict, *, xla, where: str, refuse: str | None = None):
    """The result of ``op`` on the first backend of ``impl`` that can run ``call``; ``xla()`` for XLA."""
    choice, fn = choose(op, impl, call, where=where, refuse=refuse)
    return xla() if fn is None else fn(**call)


def _record(where: str, choice: Choice) -> Choice:
    _choices[where] = choice
    key = (where, choice.op, choice.backend)
    if key not in _logged:
        _logged.add(key)
        passed = "".join(f"; passed over {name}: {reason}" for name, reason in choice.skipped)
        logger.info("%s: %s runs on %s%s", where, choice.op, choice.backend, passed)
    return choice


def choices() -> dict[str, Choice]:
    """The latest ``Choice`` per method (as the methods name themselves in ``where``), for inspection."""
    return dict(_choices)

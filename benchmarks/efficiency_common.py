"""Helpers shared by the efficiency benchmarks (``attention_efficiency.py``, ``lra_efficiency.py``, the decoding
ones): the device line, XLA's planned memory of a compiled step, best-of timing, the length label, a loop over cells
that writes the rows and table, and the time/memory plot."""

import datetime
import json
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def device_description() -> str:
    """'<device kind> x<count> (<host processor>)', the device line of every results header."""
    import jax

    return f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()})"


def today() -> str:
    return datetime.date.today().isoformat()


def planned_bytes(compiled) -> int:
    """The peak XLA plans for one call of ``compiled``: arguments + outputs + temporaries, less donated aliases."""
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run()`` (which blocks until its results are ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def length_label(n: int) -> str:
    """'4K' for multiples of 1024, else the number."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def write_jsonl(path: str, rows: list[dict], stamp: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")


def measure_cells(cells, measure, describe, markdown, out: str) -> list[dict]:
    """``measure(*cell)`` for each cell, each row printed by ``describe(row)`` as it comes; then the rows (with the
    date and device) to ``out.jsonl`` and ``markdown(rows, stamp)`` to ``out.md``."""
    from effjax.files import write_atomic

    stamp = {"date": today(), "device": device_description()}
    print(f"device: {stamp['device']}")
    rows = []
    for cell in cells:
        rows.append(measure(*cell))
        print(describe(rows[-1]), flush=True)
    write_jsonl(out + ".jsonl", rows, stamp)
    write_atomic(out + ".md", markdown(rows, stamp))
    print(f"\nwrote {out}.jsonl and .md")
    return rows


def plot(rows: list[dict], path: str, *, time_key="seconds", time_label="forward+backward seconds",
         memory_label="planned peak MiB", baseline="softmax") -> None:
    """Log-log plots of ``time_key`` and ``memory_bytes`` against ``length``, one line per ``method`` ('ok' rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    methods = sorted({r["method"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(methods):
        ok = sorted((r for r in rows if r["method"] == method and r.get("status") == "ok"), key=lambda r: r["length"])
        if not ok:
            continue
        style = (dict(lw=2.5, color="black") if method == baseline else  # distinct colour x line-style pairs
                 dict(lw=1.2, color=colors[index % len(colors)], ls=("-", "--", ":")[index // len(colors) % 3]))
        lengths = [r["length"] for r in ok]
        axes[0].loglog(lengths, [r[time_key] for r in ok], marker="o", ms=3, label=method, **style)
        axes[1].loglog(lengths, [r["memory_bytes"] / 2**20 for r in ok], marker="o", ms=3, **style)
    axes[0].set(xlabel="sequence length", ylabel=time_label, title="time")
    axes[1].set(xlabel="sequence length", ylabel=memory_label, title="memory")
    fig.legend(loc="center right", fontsize=7, ncol=1, handlelength=3)
    fig.subplots_adjust(right=0.82)
    fig.savefig(path, dpi=110)

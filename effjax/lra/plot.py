"""``lra_results.png``: accuracy per task as grouped bars (one bar per method), the paper's value (LRA Table 1) of
the same model as a marker on its bar, and the ListOps majority-class rate as a dashed line."""

import os

from effjax.lra import report


def write(doc: dict, path: str) -> str | None:
    """Draws the chart of a report document to ``path`` (atomically); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks, methods = doc["tasks"], doc["methods"]
    cells = {(c["task"], c["method"]): c for c in doc["cells"]}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 0.3 * len(methods)), 4.0))
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        ours = [report.percent(cells.get((task, method))) for task in tasks]
        bars = ax.bar(xs, [v or 0.0 for v in ours], width, label=method)
        for x, task, value in zip(xs, tasks, ours, strict=True):
            if value is None:  # no bar: say why (no data, failed, not run)
                status = (cells.get((task, method)) or {}).get("status", report.PENDING)
                ax.text(x, 2, status, rotation=90, ha="center", va="bottom", fontsize="x-small", color="gray")
        ref = (doc["paper"].get(method) or {}).get("accuracy") or {}
        points = [(x, ref.get(task)) for x, task in zip(xs, tasks, strict=True) if ref.get(task) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "D", color=bars.patches[0].get_facecolor(), markeredgecolor="black",
                    markersize=5, linestyle="none")
    if "listops" in tasks:
        rates = [c["majority_class_rate"] for c in doc["cells"] if c["task"] == "listops"
                 and c.get("majority_class_rate") is not None]
        if rates:
            t = tasks.index("listops")
            ax.hlines(100 * max(rates), t - 0.45, t + 0.45, colors="gray", linestyles="dashed",
                      label="ListOps majority class")
    ax.plot([], [], "D", color="white", markeredgecolor="black", label="paper (LRA Table 1)")
    ax.set_xticks(range(len(tasks)), [report.TITLES[t] for t in tasks])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"LRA, protocol={doc['protocol']}, size={doc['size']}" + (", pretrained" if doc["pretrain"] else ""))
    ax.legend(fontsize="small", ncol=2, loc="upper left")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path

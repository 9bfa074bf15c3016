"""The LRA efficiency benchmark's tables and plan, apart from its command-line flags (so tests can import them)."""

from benchmarks import efficiency_common as shared

GB = 2**30


def cell(row: dict, base: dict, value: str, fmt: str) -> str:
    """'value (ratio x)' for an 'ok' row (the ratio to ``base`` when it ran), else its status in short."""
    status = row.get("status", "")
    if status != "ok":
        return status if status.startswith("skipped") else status.split(":")[0] or "-"
    text = format(row[value] / (GB if value == "memory_bytes" else 1), fmt)
    if base.get("status") == "ok":
        text += f" ({row[value] / base[value]:.2f}x)"
    return text


def tables(rows: list[dict], lengths: list[int], impls: list[str]) -> str:
    """Markdown in LRA Table 2's layout: steps/s, then memory (GB), per method, length and impl."""
    by = {(r["method"], r["impl"], r["length"]): r for r in rows}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "softmax", m))
    columns = [(n, impl) for n in lengths for impl in impls]
    label = lambda n, impl: shared.length_label(n) + (f" {impl}" if len(impls) > 1 else "")  # noqa: E731
    out = []
    for title, value, fmt in (("steps/s", "steps_per_sec", ".2f"), ("memory GB", "memory_bytes", ".2f")):
        out.append(f"| {title} | " + " | ".join(label(n, impl) for n, impl in columns) + " |")
        out.append("|---" * (len(columns) + 1) + "|")
        for method in methods:
            cells = [cell(by[(method, impl, n)], by.get(("softmax", impl, n), {}), value, fmt)
                     if (method, impl, n) in by else "-" for n, impl in columns]
            out.append(f"| `{method}` | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plan(methods: list[str], impls: list[str]) -> list[tuple[str, str]]:
    """(method, impl) pairs to run: softmax first; 'pallas' only for methods with a kernel path."""
    from effjax.models import layer_attention

    methods = ["softmax"] + [m for m in methods if m != "softmax"]
    return [(m, impl) for m in methods for impl in impls if impl == "xla" or layer_attention.has_kernel_path(m)]

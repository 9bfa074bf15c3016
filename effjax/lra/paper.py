"""LRA Table 1 (Tay et al. 2021, "Long Range Arena", paper Table 1; ``shared/methods/lra.md`` §2), keyed by
the effjax attention method that implements each model. Accuracies in percent; Path-X is "FAIL" for every model.

Models without an effjax method here (Sparse Transformer, Sinkhorn, Synthesizer) are left out; effjax methods
without a paper model get no paper row.
"""

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
FIVE_TASKS = TASKS[:5]  # the paper's average leaves Path-X out

# effjax method -> (paper model name, {task: accuracy %} with None for FAIL, the paper's printed 5-task average)
TABLE1 = {
    "softmax": ("Transformer", (36.37, 64.27, 57.46, 42.44, 71.40, None), 54.39),
    "block_local": ("Local Attention", (15.82, 52.98, 53.39, 41.46, 66.63, None), 46.06),
    "longformer": ("Longformer", (35.63, 62.85, 56.89, 42.22, 69.71, None), 53.46),
    "linformer": ("Linformer", (35.70, 53.94, 52.27, 38.56, 76.34, None), 51.36),
    "reformer": ("Reformer", (37.27, 56.10, 53.40, 38.07, 68.50, None), 50.67),
    "bigbird": ("BigBird", (36.05, 64.02, 59.29, 40.83, 74.87, None), 55.01),
    "linear_elu": ("Linear Trans.", (16.13, 65.90, 53.09, 42.34, 75.30, None), 50.55),
    "performer": ("Performer", (18.01, 65.40, 53.82, 42.77, 77.05, None), 51.41),
}

LISTOPS_NOTE = ("ListOps chance is the majority class (about 17%: labels 0 and 9), not 10%; the table shows each "
                "run's majority-class rate of its evaluation split beside its accuracy (lra.md §7.4).")
AVERAGES_NOTE = ("LRA (5 tasks) is the paper's average without Path-X; 6 tasks is the S4 convention, Path-X counted "
                 "as 50 when it failed or scored below 50 (lra.md §7.2: Transformer 54.39 vs 53.66).")


def model_name(method: str) -> str | None:
    """The paper's name of the model ``method`` implements, or None."""
    return TABLE1[method][0] if method in TABLE1 else None


def row(method: str) -> dict[str, float | None] | None:
    """The paper's accuracies (%) of ``method`` by task (None = FAIL), or None without a paper row."""
    if method not in TABLE1:
        return None
    return dict(zip(TASKS, TABLE1[method][1], strict=True))


def printed_average(method: str) -> float | None:
    """The paper's printed 5-task average of ``method``."""
    return TABLE1[method][2] if method in TABLE1 else None

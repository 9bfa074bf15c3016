"""``python -m effjax.lra``, the Long Range Arena table runner (lra.md §2 Table 1, §7.2-3 averages, §8 metrics).

The default tier drives the runner in-process with a stub trainer (a tiny script that writes the trainer's
config.json and metrics.jsonl rows, or fails like it): names, cell layout, commands, the report parsed back and its
averages recomputed, no data / failed cells, resuming and ``--report_only``. The slow tier runs the real trainer
through ``python -m effjax.lra`` in subprocesses: a rerun skips finished cells, and a kill -9 resumes.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, checkpoint_steps, subprocess_env

from effjax.lra import cells, devices, paper, report, results, run_cell, runner

STUB = r'''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
task = args["config"].split("lra_")[1].split(".py")[0]
method, workdir = args["config.model.attention"], args["workdir"]
plan_path = os.environ["STUB_PLAN"]
with open(os.path.join(os.path.dirname(plan_path), "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
stage = "pretrain" if "stage=pretrain" in args["config"] else "finetune"
what = json.load(open(plan_path)).get(f"{task}/{method}", {"ok": 0.5})
if "nodata" in what:
    sys.exit("effjax: FileNotFoundError: data set of " + task + " is not prepared; prepare it with X.")
if "crash" in what and stage == "finetune":
    print("some output", flush=True)
    sys.stderr.write("Traceback (most recent call last):\nRuntimeError: stub crashed on " + task + "\n")
    sys.exit(1)
os.makedirs(workdir, exist_ok=True)
json.dump({"total_steps": 4}, open(os.path.join(workdir, "config.json"), "w"))
acc = what.get("ok", what.get("val", 0.5))
rows = [{"step": 2, "eval/accuracy": 0.01, "eval/loss": 9.0},
        {"step": 4, "eval/accuracy": acc - 0.01, "eval/loss": 1.5, "eval/majority_class_rate": 0.17}]
if "ok" in what and stage == "finetune":
    rows.append({"step": 4, "test/accuracy": acc, "test/loss": 1.0, "test/majority_class_rate": 0.175})
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print("Finished 4 steps.")
'''

# (task, method) -> what the stub does; accuracies chosen so that every average is distinct.
PLAN = {
    **{f"{t}/softmax": {"ok": a} for t, a in zip(paper.TASKS, (0.36, 0.64, 0.57, 0.42, 0.71, 0.45), strict=True)},
    **{f"{t}/performer": {"ok": a} for t, a in zip(paper.TASKS, (0.18, 0.65, 0.54, 0.43, 0.77, 0.61), strict=True)},
    "image/performer": {"val": 0.40},  # no test row: read from the validation row, marked (val)
    "pathx/performer": {"crash": True},  # a failed Path-X counts as 50 in the 6-task average
    "text/linformer": {"nodata": True},
    "retrieval/linformer": {"crash": True},
}
METHODS = ["softmax", "performer", "linformer"]


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """A stub trainer command, its plan (STUB_PLAN) and a reader of the commands it ran."""
    monkeypatch.chdir(ROOT)
    script = tmp_path / "stub" / "trainer.py"
    script.parent.mkdir()
    script.write_text(STUB)
    plan = script.parent / "plan.json"
    plan.write_text(json.dumps(PLAN))
    monkeypatch.setenv("STUB_PLAN", str(plan))

    def calls():
        path = script.parent / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return (sys.executable, str(script)), calls


def settings(tmp_path, trainer, **kwargs):
    return runner.Settings(**{"workdir": str(tmp_path / "lra"), "tasks": ["all"], "methods": METHODS,
                              "size": "smoke", "trainer": trainer, "plot": False, **kwargs})


def parse_table(markdown: str) -> dict:
    """{row label: [cell texts]} of the results table (ours: `method`; the paper's: '↳ paper: Model')."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `") or line.startswith("| ↳ paper"):
            label, *values = [c.strip() for c in line.strip("|").split(" | ")]
            rows[label.strip("`")] = values
    return rows


def number(text: str) -> float | None:
    match = re.match(r"^-?\d+\.\d+", text)
    return float(match.group()) if match else None


# --- names, planning, commands -----------------------------------------------------------------------------

def test_unknown_task_or_method_fails_at_once_with_the_valid_names(tmp_path, stub):
    trainer, calls = stub
    with pytest.raises(ValueError, match=r"Unknown LRA task 'listop' in --tasks; known: all, image, listops.*"
                                         r"Did you mean 'listops'\?"):
        runner.run(settings(tmp_path, trainer, tasks=["listop"]))
    with pytest.raises(ValueError, match=r"Unknown attention method 'softmx' in --methods; known: .*performer.*"
                                         r"Did you mean 'softmax'\?"):
        runner.run(settings(tmp_path, trainer, methods=["softmax", "softmx"]))
    with pytest.raises(ValueError, match="Unknown --protocol 'new'; known: lra_original, modern"):
        runner.run(settings(tmp_path, trainer, protocol="new"))
    with pytest.raises(ValueError, match="sets what the runner sets per cell"):
        runner.run(settings(tmp_path, trainer, overrides=("--config.model.attention=softmax",)))
    with pytest.raises(ValueError, match="is not a config override"):
        cells.parse_overrides(["total_steps=3"])
    assert calls() == [] and not os.path.exists(tmp_path / "lra")


def test_command_line_refuses_a_bad_method_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effjax.lra", "--methods=softmx", "--tasks=listops",
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("effjax.lra: Unknown attention method 'softmx'") and "'softmax'?" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_cell_plan_layout_and_commands(tmp_path):
    assert cells.check_tasks("all") == list(paper.TASKS)
    assert cells.check_tasks(["pathx", "listops"]) == ["listops", "pathx"]  # table (suite) order
    assert cells.check_methods(["paper"]) == list(paper.TABLE1)
    assert cells.check_methods(["softmax", "paper"])[:2] == ["softmax", "block_local"]
    plan = cells.plan(str(tmp_path), ["listops", "text"], ["softmax", "performer"])
    assert [(c.task, c.method, c.dir) for c in plan] == [
        (t, m, str(tmp_path / t / m)) for t in ("listops", "text") for m in ("softmax", "performer")]
    cell = plan[1]
    overrides = cells.parse_overrides(["--config.total_steps=100 config.model.num_layers=2"])
    assert overrides == ["--config.total_steps=100", "--config.model.num_layers=2"]
    argv = cells.command(cell, cells.config_arg("modern", "cpu"), overrides, init_from=cell.pretrain_dir)
    assert argv == [sys.executable, "-m", "effjax.main",
                    "--config=configs/lra_listops.py:protocol=modern,size=cpu,stage=finetune",
                    f"--workdir={tmp_path}/listops/performer", "--config.total_steps=100",
                    "--config.model.num_layers=2", "--config.model.attention=performer",
                    f"--config.init_from={tmp_path}/listops/performer/pretrain"]
    pre = cells.command(cell, cells.config_arg("modern", "cpu", "pretrain"), [], stage="pretrain")
    assert pre[3:] == ["--config=configs/lra_listops.py:protocol=modern,size=cpu,stage=pretrain",
                       f"--workdir={tmp_path}/listops/performer/pretrain", "--config.model.attention=performer"]



def test_data_dirs_reach_only_their_task_and_are_not_part_of_the_identity(tmp_path):
    assert cells.parse_data_dirs(["text=/d/tfds", "retrieval=/d/tsv"]) == {"text": "/d/tfds", "retrieval": "/d/tsv"}
    with pytest.raises(ValueError, match="not task=DIR"):
        cells.parse_data_dirs(["/d/tfds"])
    with pytest.raises(ValueError, match="Unknown task with prepared data 'listops'.*image, retrieval, text"):
        cells.parse_data_dirs(["listops=/d"])
    text, listops = cells.plan(str(tmp_path), ["text", "listops"], ["softmax"])
    job = run_cell.Job(text, "lra_original", "cpu", False, ("--config.seed=1",), data_dir="/d/tfds")
    assert job.location_overrides == ("--config.seed=1", "--config.data.data_dir=/d/tfds")
    assert run_cell.Job(listops, "lra_original", "cpu", False).location_overrides == ()
    assert job.identity == run_cell.Job(text, "lra_original", "cpu", False, ("--config.seed=1",)).identity


def test_device_groups_and_their_environment():
    assert devices.groups(["0", "1", "2", "3", "4"], 2) == [("0", "1"), ("2", "3")]
    assert devices.env(("2", "3"), 1) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    tpu = devices.env(("2", "3"), 1, "tpu")
    assert tpu["TPU_VISIBLE_CHIPS"] == "2,3" and tpu["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1"
    assert tpu["TPU_MESH_CONTROLLER_PORT"] != devices.env(("0", "1"), 0, "tpu")["TPU_MESH_CONTROLLER_PORT"]
    with pytest.raises(ValueError, match="lists 1 device"):
        devices.groups(["0"], 2)


# --- the report ----------------------------------------------------------------------------------------------

def test_paper_rows_reproduce_the_printed_and_the_s4_averages():
    for method, (_, values, printed) in paper.TABLE1.items():
        assert sum(values[:5]) / 5 == pytest.approx(printed, abs=0.005), method
    s4 = {"softmax": 53.66, "bigbird": 54.17, "performer": 51.18, "linear_elu": 50.46, "reformer": 50.56}
    for method, value in s4.items():  # S4 paper Table 4 (lra.md §2); S4 prints BigBird's 54.1767 as 54.17
        assert report.paper_averages(method)["lra6"] == pytest.approx(value, abs=0.01), method


def expected_averages(method):
    """Both averages from the stub's plan, computed here independently of the report."""
    accs = []
    for task in paper.TASKS:
        what = PLAN.get(f"{task}/{method}", {"ok": 0.5})
        acc = what["ok"] if "ok" in what else what.get("val", 0.0) - 0.01  # the stub's eval row is 1 point lower
        accs.append(100 * acc if "crash" not in what and "nodata" not in what
                    else ("failed" if "crash" in what else None))
    if any(not isinstance(a, float) for a in accs[:5]):
        return None, None
    pathx = 50.0 if accs[5] == "failed" else max(accs[5], 50.0)
    return sum(accs[:5]) / 5, (sum(accs[:5]) + pathx) / 6


def test_run_writes_the_table_and_its_averages_with_no_data_and_failed_cells(tmp_path, stub, capsys):
    trainer, calls = stub
    code = runner.run(settings(tmp_path, trainer, overrides=("--config.total_steps=4",)))
    assert code == 1, "a failed cell makes the exit code non-zero"
    out = capsys.readouterr().out
    assert out.count("lra: start ") == 18 and out.count("lra: done ") == 18
    assert "lra: 18 cells: 15 ok, 1 no data, 2 failed" in out
    assert all(c["cwd"] == ROOT and "--config.total_steps=4" in c["argv"] for c in calls())
    work = tmp_path / "lra"
    doc = json.loads((work / "lra_results.json").read_text())
    table = parse_table((work / "lra_results.md").read_text())
    cell = {(c["task"], c["method"]): c for c in doc["cells"]}
    assert cell[("listops", "softmax")]["accuracy"] == 0.36 and cell[("listops", "softmax")]["split"] == "test"
    assert cell[("image", "performer")]["split"] == "validation"
    assert cell[("text", "linformer")]["status"] == "no data"
    assert "is not prepared" in cell[("text", "linformer")]["message"]
    failed = cell[("retrieval", "linformer")]
    assert failed["status"] == "failed"
    assert failed["message"] == f"RuntimeError: stub crashed on retrieval (log: {work}/retrieval/linformer/run.log)"
    assert "Traceback" in (work / "retrieval" / "linformer" / "run.log").read_text()
    for method in METHODS:
        five, six = expected_averages(method)
        assert doc["averages"][method]["lra5"] == (pytest.approx(five) if five else None), method
        assert doc["averages"][method]["lra6"] == (pytest.approx(six) if six else None), method
        row = table[method]
        assert number(row[6]) == (pytest.approx(five, abs=0.005) if five else None)
        assert number(row[7]) == (pytest.approx(six, abs=0.005) if six else None)
        # the table's per-task numbers are the cells' accuracies, in the paper's column order
        for task, text in zip(paper.TASKS, row[:6], strict=True):
            acc = cell[(task, method)]["accuracy"]
            assert number(text) == (pytest.approx(100 * acc, abs=0.005) if acc is not None else None)
    assert table["softmax"][0] == "36.00 (maj. 17.50)" and table["performer"][3] == "39.00 (val)"
    assert table["linformer"][1] == "no data" and table["linformer"][2] == "failed"
    assert table["performer"][5] == "failed"
    assert table["↳ paper: Transformer"] == ["36.37", "64.27", "57.46", "42.44", "71.40", "FAIL", "54.39", "53.66"]
    assert "↳ paper: Performer" in table and "↳ paper: Linformer" in table
    md = (work / "lra_results.md").read_text()
    assert "protocol=lra_original, size=smoke" in md and "overrides: --config.total_steps=4" in md
    assert "text/linformer (no data): effjax: FileNotFoundError" in md and "retrieval/linformer (failed)" in md
    assert "majority class" in md and "Path-X counted as 50" in md

    # resume: ok cells are skipped (never run again); the failed and no-data cells are rerun
    before = len(calls())
    (work / "lra_results.md").unlink()
    assert runner.run(settings(tmp_path, trainer, overrides=("--config.total_steps=4",))) == 1
    rerun = {(c["argv"][0].split("lra_")[1].split(".py")[0], c["argv"][-1].split("=")[1]) for c in calls()[before:]}
    assert rerun == {("text", "linformer"), ("retrieval", "linformer"), ("pathx", "performer")}
    assert "lra: skipped listops/softmax: finished earlier" in capsys.readouterr().out
    assert "skipped: finished earlier" in (work / "listops" / "softmax" / "run.log").read_text()

    # --report_only rebuilds the same table from the cells' result.json files, running nothing
    md = (work / "lra_results.md").read_text()
    for name in ("lra_results.md", "lra_results.json"):
        (work / name).unlink()
    before = len(calls())
    assert runner.run(runner.Settings(workdir=str(work), tasks=[], methods=[], report_only=True, plot=False)) == 0
    assert len(calls()) == before
    rebuilt = (work / "lra_results.md").read_text()
    assert parse_table(rebuilt) == parse_table(md)
    assert "size=smoke" in rebuilt and "overrides: --config.total_steps=4" in rebuilt, "the settings the cells ran with"
    assert sorted(json.loads((work / "lra_results.json").read_text())["methods"]) == sorted(METHODS)


def test_changed_settings_rerun_or_refuse(tmp_path, stub):
    trainer, calls = stub
    assert runner.run(settings(tmp_path, trainer, tasks=["listops"], methods=["softmax"])) == 0
    assert runner.run(settings(tmp_path, trainer, tasks=["listops"], methods=["softmax"])) == 0
    assert len(calls()) == 1
    assert runner.run(settings(tmp_path, trainer, tasks=["listops"], methods=["softmax"],
                               overrides=("--config.seed=1",))) == 0
    assert len(calls()) == 2, "a finished cell under other overrides is run again (the trainer resumes it)"
    with pytest.raises(ValueError, match="holds a run with size=smoke; pass the same settings"):
        runner.run(settings(tmp_path, trainer, tasks=["listops"], methods=["softmax"], size="cpu"))


def test_pretrain_stage_runs_first_and_the_fine_tune_starts_from_it(tmp_path, stub):
    trainer, calls = stub
    assert runner.run(settings(tmp_path, trainer, tasks=["listops"], methods=["softmax"], pretrain=True)) == 0
    pre, fine = (c["argv"] for c in calls())
    cell = tmp_path / "lra" / "listops" / "softmax"
    assert "stage=pretrain" in pre[0] and pre[1] == f"--workdir={cell}/pretrain"
    assert "stage=finetune" in fine[0] and fine[1] == f"--workdir={cell}" and fine[-1] == f"--config.init_from=" \
        f"{cell}/pretrain"
    result = results.read(str(cell))
    assert result["status"] == "ok" and result["pretrain"] is True


def test_parallel_cells_in_worker_processes_with_their_devices(tmp_path, stub):
    trainer, calls = stub
    code = runner.run(settings(tmp_path, trainer, tasks=["listops", "pathfinder"], methods=["softmax", "performer"],
                               devices=("0", "1", "2", "3"), gpus_per_cell=2))
    assert code == 0
    seen = [c["devices"] for c in calls()]
    assert len(seen) == 4 and set(seen) == {"0,1", "2,3"}
    doc = json.loads((tmp_path / "lra" / "lra_results.json").read_text())
    assert doc["counts"]["ok"] == 4


def test_result_json_is_the_finished_marker(tmp_path):
    cell = cells.Cell("listops", "softmax", str(tmp_path))
    job = run_cell.Job(cell, "modern", "cpu", False)
    assert run_cell.finished(job) is None
    results.write(str(tmp_path), {**job.identity, "status": "failed"})
    assert run_cell.finished(job) is None
    results.write(str(tmp_path), {**job.identity, "status": "ok"})
    assert run_cell.finished(job)["status"] == "ok"
    (tmp_path / "result.json").write_text('{"status": "ok", "tas')  # torn by hand: never by results.write
    assert results.read(str(tmp_path)) is None and run_cell.finished(job) is None
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"], "no temporary file left behind"


# --- slow tier: the real trainer through python -m effjax.lra ------------------------------------------------

def lra_command(workdir, *extra, methods="softmax,performer"):
    return [sys.executable, "-m", "effjax.lra", f"--methods={methods}", "--tasks=listops", "--size=smoke",
            f"--workdir={workdir}", *extra]


# A real trainer run of a cell, killed and resumed, then finished: the kill -9 test below; skipping finished
# cells: the stub tests above.


@pytest.mark.slow
def test_kill_9_of_the_runner_then_a_rerun_resumes_the_cell(tmp_path):
    long = ("--overrides=--config.total_steps=200 --config.checkpoint_every=20 --config.eval_every=0 "
            "--config.keep_checkpoints=3")
    cell = tmp_path / "listops" / "softmax"
    proc = subprocess.Popen(lra_command(tmp_path, long, methods="softmax"), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not checkpoint_steps(cell):
            assert proc.poll() is None, "the runner ended before the cell's first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cell / "result.json").exists()
    first = checkpoint_steps(cell)[0]
    assert first < 200
    proc = subprocess.run(lra_command(tmp_path, long, methods="softmax"), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    log = (cell / "run.log").read_text()
    assert "Resuming from the checkpoint at step" in log
    resumed = int(log.split("Resuming from the checkpoint at step ")[1].split()[0])
    assert resumed >= first
    result = results.read(str(cell))
    assert result["status"] == "ok" and result["step"] == 200


@pytest.mark.slow  # starts a local Ray instance (about 10 s); the default tier runs the same cells in local workers
def test_cells_as_ray_tasks_give_the_same_table(tmp_path, stub):
    pytest.importorskip("ray")
    trainer, calls = stub
    kwargs = dict(tasks=["listops", "pathfinder"], methods=["softmax", "performer"], parallel=2)
    assert runner.run(settings(tmp_path / "ray", trainer, ray_address="local", **kwargs)) == 0
    assert runner.run(settings(tmp_path / "local", trainer, **kwargs)) == 0
    tables = [parse_table((tmp_path / d / "lra" / "lra_results.md").read_text()) for d in ("ray", "local")]
    assert tables[0] == tables[1] and number(tables[0]["softmax"][0]) == 36.0
    assert len(calls()) == 8

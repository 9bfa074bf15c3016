"""The search engine on the synthetic space: hurdles, journal, evolution, failures, determinism and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from effjax.search import evolution, hurdles, journal, results
from effjax.search.executors import InlineExecutor, ProcessExecutor
from effjax.search.synthetic import TARGET, DigitEvaluator, DigitSpace

SPACE = DigitSpace()
SMALL = dict(fingerprint={"test": 1}, population=12, tournament=4, min_history=4, progress=False)


@pytest.fixture
def tmp(tmp_path):
    """A directory on tmpfs when there is one: the journal fsyncs every line, which is slow on a disk."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(dir="/dev/shm", prefix="effjax-search-test-")
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path)


def lines(workdir):
    """The journal without its timing fields, the part that must be reproducible."""
    _, events, _ = journal.read(os.path.join(workdir, journal.FILENAME))
    return [{k: v for k, v in e.items() if k not in ("wall", "time")} for e in events]


def search(workdir, n=60, evaluator=None, **kw):
    return evolution.run_search(SPACE, evaluator or DigitEvaluator(), workdir=workdir, max_candidates=n,
                                **{**SMALL, **kw})


def test_hurdle_arithmetic():
    np.testing.assert_allclose(hurdles.cut_points(4, 25200), [812.9, 2438.7, 5690.3, 12193.5], atol=0.05)
    assert hurdles.expected_cost(4, 25200) == pytest.approx(4064.5, abs=0.05)
    assert sum(hurdles.band_lengths(4, 25200)) == pytest.approx(25200)
    assert hurdles.band_steps(2, 70) == [10, 20, 40] and sum(hurdles.band_steps(4, 1000)) == 1000
    with pytest.raises(ValueError, match="too small"):
        hurdles.band_steps(4, 10)


def test_median_rule():
    assert hurdles.passes(100.0, [1.0] * 9, min_history=10)  # too little history: everyone passes
    earlier = [float(x) for x in range(10)]  # median 4.5
    assert hurdles.passes(4.5, earlier) and hurdles.passes(0.0, earlier) and not hurdles.passes(4.6, earlier)
    assert hurdles.passes(2.0, [1.0, 2.0, 9.0], min_history=3) and not hurdles.passes(2.1, [1.0, 2.0, 9.0], 3)


def test_journal_round_trip_torn_line_and_refusal(tmp):
    assert journal.fingerprint({"a": 1, "b": (1, 2)}) == journal.fingerprint({"b": [1, 2], "a": 1})
    events = [{"event": "created", "id": i, "x": [i, 0.5]} for i in range(3)]
    with journal.Journal(tmp, {"a": 1}, "s") as j:
        for e in events:
            j.append(e)
    path = os.path.join(tmp, journal.FILENAME)
    with open(path, "ab") as f:
        f.write(b'{"event":"created","id":3,"x":[')  # a crash in the middle of a write
    j = journal.Journal(tmp, {"a": 1}, "s")
    untimed = lambda evs: [{k: v for k, v in e.items() if k != "time"} for e in evs]  # noqa: E731
    assert untimed(j.events) == events and all("time" in e for e in j.events)  # the torn line is ignored
    j.append({"event": "created", "id": 3})
    j.close()
    assert untimed(journal.read(path)[1]) == events + [{"event": "created", "id": 3}]
    assert open(path, "rb").read().count(b"\n") == 5  # header, 4 events: the torn bytes were truncated
    before = open(path, "rb").read()
    with pytest.raises(ValueError, match="belongs to another search") as err:
        journal.Journal(tmp, {"a": 2}, "s")
    assert "\n" not in str(err.value) and "new --workdir or the original config" in str(err.value)
    assert open(path, "rb").read() == before
    with pytest.raises(ValueError, match="plain JSON"):
        journal.fingerprint({"a": object()})


def test_synthetic_json_round_trip():
    c = (1, 2, 3, 4, 5, 6, 7, 8)
    assert SPACE.key(SPACE.from_json(json.loads(json.dumps(SPACE.to_json(c))))) == SPACE.key(c)
    for bad in [{"digits": [1] * 7}, {"digits": [10] * 8}, {"digits": "x"}, [], {"digits": [1.0] * 8}]:
        with pytest.raises(ValueError, match="DigitSpace.to_json") as err:
            SPACE.from_json(bad)
        assert "\n" not in str(err.value)


def test_search_finds_target_without_duplicate_keys(tmp):
    r = search(tmp, n=300, population=20, tournament=5)
    assert r.best["fitness"] <= 1 and r.stopped is None and len(r.history) == 300
    assert r.best["fitness"] == 0 and tuple(r.best["candidate"]["digits"]) == TARGET
    created = [e for e in lines(tmp) if e["event"] == "created"]
    keys = [e["key"] for e in created]
    assert len(keys) == len(set(keys)) == 300  # every key once: the seed once, duplicates re-mutated
    assert sum(";" in e["mutation"] for e in created) > 0  # re-mutation did happen (no-op digit draws)
    statuses = {rec["status"] for rec in r.history}
    assert "finished" in statuses and any(s.startswith("stopped at hurdle") for s in statuses)
    ev = lines(tmp)
    for e in ev:  # the controller journals each hurdle; a candidate stopped at k has no later band
        if e["event"] == "hurdle" and not e["passed"]:
            assert not any(x["event"] == "band" and x["id"] == e["id"] and x["band"] > e["k"] for x in ev)
    assert len(r.population) == 20
    paths = results.write_outputs(tmp, SPACE)
    rows = open(paths["csv"]).read().splitlines()
    assert len(rows) == 301 and rows[0].startswith("id,parent,mutation,status,fitness,cost,info,wall,reason")
    assert json.load(open(paths["json"])) == r.best["candidate"]
    assert "L1 distance 0" in open(paths["txt"]).read() and os.path.getsize(paths["png"]) > 1000


def test_failures_are_recorded_and_the_search_goes_on(tmp):
    ev = DigitEvaluator(raise_on=(0, 3), nan_on=(5, 9))  # each (position, digit) is one mutation in 80
    r = search(tmp, n=240, evaluator=ev)
    assert len(r.history) == 240
    failed = {rec["id"]: rec["reason"] for rec in r.history if rec["status"] == "failed"}
    digits = {rec["id"]: rec["candidate"]["digits"] for rec in r.history}
    expect_raise = {i for i, d in digits.items() if d[0] == 3}
    expect_nan = {i for i, d in digits.items() if d[5] == 9} - expect_raise
    assert expect_raise and expect_nan and set(failed) == expect_raise | expect_nan
    assert all(failed[i] == "RuntimeError: synthetic failure: digit 3 at position 0" for i in expect_raise)
    assert all(failed[i] == "objective 'fitness' is nan (non-finite)" for i in expect_nan)
    assert not set(failed) & {m["id"] for m in r.population}
    row = [x for x in open(os.path.join(results.write_outputs(tmp, SPACE, plot=False)["csv"]))][1 + min(failed)]
    assert ",failed," in row and ("synthetic failure" in row or "non-finite" in row)


def test_same_seed_same_journal(tmp):
    a, b, c = (os.path.join(tmp, x) for x in "abc")
    search(a, seed=3, in_flight=3)
    search(b, seed=3, in_flight=3)
    search(c, seed=4, in_flight=3)
    assert lines(a) == lines(b) != lines(c)


class Crash(BaseException):
    """Not an Exception: it escapes the executor like a crash of the controller."""


class CrashAt(DigitEvaluator):
    def __init__(self, k, **kw):
        super().__init__(**kw)
        object.__setattr__(self, "calls", [0, k])

    def run_band(self, *args):
        self.calls[0] += 1
        if self.calls[0] == self.calls[1]:
            raise Crash()
        return super().run_band(*args)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp, in_flight):
    full, cut = os.path.join(tmp, "full"), os.path.join(tmp, "cut")
    ref = search(full, n=50, in_flight=in_flight, seed=1)
    for k in (7, 40):  # crash twice, resume each time
        with pytest.raises(Crash):
            search(cut, n=50, in_flight=in_flight, seed=1, evaluator=CrashAt(k))
    r = search(cut, n=50, in_flight=in_flight, seed=1)
    assert lines(cut) == lines(full)
    assert [m["id"] for m in r.population] == [m["id"] for m in ref.population]


def test_resume_from_a_journal_cut_anywhere(tmp):
    full = os.path.join(tmp, "full")
    ref = search(full, n=40, seed=2, in_flight=2)
    data = open(os.path.join(full, journal.FILENAME), "rb").read()
    rng = np.random.default_rng(0)
    newlines = [i + 1 for i, ch in enumerate(data) if ch == ord("\n")]
    for trial, end in enumerate([newlines[1], *rng.choice(newlines, 3), *rng.integers(len(data), size=3)]):
        d = os.path.join(tmp, f"cut{trial}")
        os.makedirs(d)
        with open(os.path.join(d, journal.FILENAME), "wb") as f:
            f.write(data[:end])  # a whole line or a torn one
        r = search(d, n=40, seed=2, in_flight=2)
        assert lines(d) == lines(full), f"cut at byte {end}"
        assert [m["id"] for m in r.population] == [m["id"] for m in ref.population]


def test_wall_clock_stop_then_resume(tmp):
    full, cut = os.path.join(tmp, "full"), os.path.join(tmp, "cut")
    search(full, n=30, evaluator=DigitEvaluator(sleep=0.005))
    r = search(cut, n=30, evaluator=DigitEvaluator(sleep=0.005), max_wall_seconds=0.15)
    assert r.stopped == "wall" and len(r.history) < 30
    assert search(cut, n=30, evaluator=DigitEvaluator(sleep=0.005)).stopped is None
    assert lines(cut) == lines(full)


class TermAt(DigitEvaluator):
    def run_band(self, candidate_json, band, candidate_dir, seed):
        if candidate_json["digits"] == list(TERM_AT):
            os.kill(os.getpid(), signal.SIGTERM)  # the search stops after this band and journals nothing more
        return super().run_band(candidate_json, band, candidate_dir, seed)


TERM_AT = None


def test_sigterm_stops_cleanly_then_resume(tmp, monkeypatch):
    full, cut = os.path.join(tmp, "full"), os.path.join(tmp, "cut")
    ref = search(full, n=40, in_flight=2)
    monkeypatch.setattr(sys.modules[__name__], "TERM_AT", tuple(ref.history[15]["candidate"]["digits"]))
    previous = signal.getsignal(signal.SIGTERM)
    r = search(cut, n=40, in_flight=2, evaluator=TermAt())
    assert r.stopped == "sigterm" and 5 < len(r.history) < 40 and signal.getsignal(signal.SIGTERM) == previous
    assert lines(cut) == lines(full)[:len(lines(cut))]
    search(cut, n=40, in_flight=2)
    assert lines(cut) == lines(full)


def test_multi_objective_search_uses_pareto_ranks(tmp):
    ev = DigitEvaluator(objectives=("fitness", "size"))
    r = search(tmp, n=80, evaluator=ev, objectives=("fitness", "size"))
    assert all(set(m["objectives"]) == {"fitness", "size"} for m in r.population)
    pts = [(f["objectives"]["fitness"], f["objectives"]["size"]) for f in r.front]
    assert len(pts) > 1 and (31.0, 0.0) in pts  # the all-zeros seed has the smallest size: never dominated
    assert not any(a[0] <= b[0] and a[1] <= b[1] and a != b for a in pts for b in pts)
    assert min(m["objectives"]["fitness"] for m in r.population) < 20  # the seed is 31 from the target
    with pytest.raises(ValueError, match="belongs to another search"):
        search(tmp, n=80, evaluator=ev)  # same workdir, single objective: another search


@pytest.mark.slow  # spawned workers; the default tier's twin: the env/errors test below
def test_process_executor_timeout_and_dead_worker(tmp):
    ev = DigitEvaluator(sleep_on=(1, 7), slow_seconds=60, die_on=(4, 6))  # hits candidates 1 and 5 of seed 5
    ex = ProcessExecutor(workers=2, timeout=1.0)
    try:
        r = search(tmp, n=20, evaluator=ev, executor=ex, seed=5)
    finally:
        ex.close()
    failed = {rec["id"]: rec["reason"] for rec in r.history if rec["status"] == "failed"}
    digits = {rec["id"]: rec["candidate"]["digits"] for rec in r.history}
    slow = {i for i, d in digits.items() if d[1] == 7}
    dead = {i for i, d in digits.items() if d[4] == 6} - slow
    assert len(r.history) == 20 and slow and dead and set(failed) == slow | dead, (failed, digits)
    assert all(failed[i] == "timed out after 1 s" for i in slow)
    assert all(failed[i] == "worker process died (exit code 3)" for i in dead)


def _refuse():
    raise RuntimeError("refuses to unpickle")


class Unpicklable:
    def __reduce__(self):
        return _refuse, ()


def test_process_executor_env_errors_and_unpicklable_task():
    ex = ProcessExecutor(workers=1, env={"EFFJAX_SEARCH_TEST": "42"}, retries=1)
    try:
        handles = [ex.submit(os.getenv, ("EFFJAX_SEARCH_TEST",)), ex.submit(int, ("x",)), ex.submit(sys.exit, (3,))]
        got = dict(ex.next_done(timeout=60) for _ in handles)
        assert got[handles[0]]["ok"] and got[handles[0]]["value"] == "42"  # env applied in the worker
        assert got[handles[1]]["reason"] == "ValueError: invalid literal for int() with base 10: 'x'"
        assert got[handles[2]]["reason"] == "SystemExit: 3"
        h = ex.submit(repr, (Unpicklable(),))  # kills its worker before it starts: retried once, then failed
        handle, outcome = ex.next_done(timeout=60)
        assert handle == h and not outcome["ok"] and "worker process died 2 times" in outcome["reason"]
        assert ex.next_done(timeout=0.1) is None
    finally:
        ex.close()


@pytest.mark.slow  # spawned workers; the default tier's twin: the env/errors test
def test_process_executor_matches_inline(tmp):
    a, b = os.path.join(tmp, "inline"), os.path.join(tmp, "process")
    search(a, n=40, executor=InlineExecutor(workers=2), evaluator=DigitEvaluator(sleep=0.01), seed=7)
    ex = ProcessExecutor(workers=2)
    try:
        search(b, n=40, executor=ex, evaluator=DigitEvaluator(sleep=0.01), seed=7)
    finally:
        ex.close()
    assert lines(a) == lines(b)


@pytest.mark.slow
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp):
    full, cut = os.path.join(tmp, "full"), os.path.join(tmp, "cut")

    def cmd(d):
        return [sys.executable, "-m", "effjax.search.synthetic", "--workdir", d, "--seed", "4", "--max-candidates",
                "60", "--in-flight", "2", "--sleep", "0.01"]

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run(cmd(full), check=True, capture_output=True, env=env, cwd=root)
    proc = subprocess.Popen(cmd(cut), env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = os.path.join(cut, journal.FILENAME)
    deadline = time.time() + 60
    while time.time() < deadline and (not os.path.exists(path) or open(path).read().count("\n") < 150):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(lines(cut)) < len(lines(full))
    subprocess.run(cmd(cut), check=True, capture_output=True, env=env, cwd=root)
    assert lines(cut) == lines(full)
    assert open(os.path.join(cut, "best.txt")).read() == open(os.path.join(full, "best.txt")).read()


def test_a_failing_seed_stops_the_search_with_its_reason_and_again_on_resume(tmp):
    evaluator = DigitEvaluator(raise_on=(0, 0))  # the seed is all zeros
    r = search(tmp, n=50, evaluator=evaluator)
    assert r.stopped.startswith("seed failed: RuntimeError: synthetic failure") and len(r.history) <= 2
    again = search(tmp, n=50, evaluator=evaluator)
    assert again.stopped == r.stopped and len(again.history) == len(r.history)

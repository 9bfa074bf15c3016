"""The Ray path: a seeded synthetic search run as Ray tasks on a local Ray instance (started by the test) writes
the same journal as the in-process path, failures and timeouts included."""

import os

import pytest
from test_search_engine import SPACE, lines

from effjax.search import evolution
from effjax.search.executors import InlineExecutor
from effjax.search.synthetic import DigitEvaluator

ray = pytest.importorskip("ray")


@pytest.mark.slow  # starts a local Ray instance (about 10 s); the default tier checks the unreachable-address error
def test_ray_tasks_give_the_same_journal_as_the_process_path(tmp_path):
    from effjax.search.ray_executor import RayExecutor

    evaluator = DigitEvaluator(raise_on=(0, 3), nan_on=(5, 9))
    kwargs = dict(fingerprint={"t": 1}, max_candidates=40, population=10, tournament=3, seed=7, min_history=4,
                  in_flight=2, progress=False)
    inline = evolution.run_search(SPACE, evaluator, workdir=str(tmp_path / "inline"), executor=InlineExecutor(2),
                                  **kwargs)
    executor = RayExecutor("local", 2, timeout=60)
    try:
        remote = evolution.run_search(SPACE, evaluator, workdir=str(tmp_path / "ray"), executor=executor, **kwargs)
        slow = RayExecutor("local", 2, timeout=1.0)  # joins the running instance
        handle = slow.submit(__import__("time").sleep, (30,))
        done = None
        while done is None:
            done = slow.next_done(timeout=0.5)
        assert done[0] == handle and not done[1]["ok"] and "timed out after 1 s" in done[1]["reason"]
    finally:
        executor.close()
    assert lines(tmp_path / "ray") == lines(tmp_path / "inline")
    assert [r["id"] for r in remote.population] == [r["id"] for r in inline.population]
    assert any(r["status"] == "failed" for r in remote.history)
    assert os.path.exists(tmp_path / "ray" / "journal.jsonl") and not ray.is_initialized()

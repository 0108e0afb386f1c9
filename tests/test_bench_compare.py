"""`diffedit bench compare`: two ShapesBench runs compared task by task, with paired intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.toy.paired import RunMismatch, compare, compare_folders, markdown


def rows_of(engine: str, outcomes: list[tuple[bool, float]], kind: str = "reshape") -> list[dict]:
    return [{"id": f"{kind}-{i:03d}", "kind": kind, "engine": engine, "status": "ok", "success": won, "bg_psnr": psnr}
            for i, (won, psnr) in enumerate(outcomes)]


outcomes = st.lists(st.tuples(st.booleans(), st.floats(5.0, 60.0)), min_size=2, max_size=40)


@settings(max_examples=40, deadline=None)
@given(a=outcomes, data=st.data())
def test_swapping_the_runs_negates_every_difference(a, data):
    """a − b and b − a: the same tasks on the other side, the same intervals mirrored, verdicts flipped."""
    b = data.draw(st.lists(st.tuples(st.booleans(), st.floats(5.0, 60.0)), min_size=len(a), max_size=len(a)))
    [ab], [ba] = compare(rows_of("x", a), rows_of("y", b), resamples=500), compare(rows_of("y", b), rows_of("x", a), resamples=500)
    assert (ab["a"], ab["b"], ba["a"], ba["b"]) == ("x", "y", "y", "x")
    assert ab["success_diff_pct"] == -ba["success_diff_pct"] and ab["bg_psnr_diff"] == -ba["bg_psnr_diff"]
    assert (ab["success_only_a"], ab["success_only_b"]) == (ba["success_only_b"], ba["success_only_a"])
    flip = {">": "<", "<": ">", "≈": "≈"}
    assert ab["success_verdict"] == flip[ba["success_verdict"]] and ab["bg_psnr_verdict"] == flip[ba["bg_psnr_verdict"]]
    assert ab["success_ci_pct"] == pytest.approx([-v for v in reversed(ba["success_ci_pct"])], abs=0.11)
    assert ab["bg_psnr_ci"] == pytest.approx([-v for v in reversed(ba["bg_psnr_ci"])], abs=0.011)
    for row in (ab, ba):  # each mean lies inside its own interval
        assert row["success_ci_pct"][0] <= row["success_diff_pct"] <= row["success_ci_pct"][1]
        assert row["bg_psnr_ci"][0] <= row["bg_psnr_diff"] <= row["bg_psnr_ci"][1]
    assert ab["bg_psnr_a_ahead"] + ba["bg_psnr_a_ahead"] <= len(a)


@settings(max_examples=30, deadline=None)
@given(a=outcomes)
def test_a_run_against_itself_is_even(a):
    [row] = compare(rows_of("x", a), rows_of("x", a), resamples=500)
    assert row["success_diff_pct"] == 0 and row["success_ci_pct"] == [0, 0] and row["success_verdict"] == "≈"
    assert row["bg_psnr_diff"] == 0 and row["bg_psnr_ci"] == [0, 0] and row["bg_psnr_verdict"] == "≈"


@settings(max_examples=30, deadline=None)
@given(a=st.lists(st.floats(5.0, 60.0), min_size=8, max_size=40), gain=st.floats(0.5, 5.0))
def test_a_background_kept_better_on_every_task_is_ahead(a, gain):
    better = rows_of("x", [(True, p + gain) for p in a])
    [row] = compare(better, rows_of("y", [(False, p) for p in a]), resamples=500)
    assert row["bg_psnr_verdict"] == ">" and row["bg_psnr_ci"][0] > 0 and row["bg_psnr_a_ahead"] == len(a)
    assert row["success_verdict"] == ">" and row["success_only_a"] == len(a)


def test_a_small_gap_over_few_tasks_is_within_the_noise():
    """Half the tasks 1 dB up, half 1.4 dB down: a mean gap of −0.2 dB that 40 tasks cannot tell from none."""
    b = [(True, 25.0)] * 40
    a = [(True, 26.0)] * 20 + [(True, 23.6)] * 20
    [row] = compare(rows_of("x", a), rows_of("y", b))
    assert row["bg_psnr_diff"] == -0.2 and row["bg_psnr_verdict"] == "≈" and row["bg_psnr_ci"][0] < 0 < row["bg_psnr_ci"][1]


def test_tasks_that_did_not_run_or_kept_every_pixel_are_left_out():
    a = rows_of("x", [(True, 30.0), (True, float("inf")), (False, 20.0)])
    b = rows_of("y", [(False, 28.0), (True, 25.0), (False, 21.0)])
    b[2]["status"] = "error"
    [row] = compare(a, b, resamples=500)
    assert row["tasks"] == 2 and row["psnr_tasks"] == 1 and row["bg_psnr_diff"] == 2.0


def test_runs_of_different_tasks_do_not_pair():
    a, b = rows_of("x", [(True, 30.0)] * 3), rows_of("y", [(True, 30.0)] * 4)
    try:
        compare(a, b)
    except RunMismatch as e:
        assert "reshape" in str(e) and "1 only in the second" in str(e)
    else:
        raise AssertionError("runs of different tasks were paired")
    # a kind only one run holds is left out, not an error
    assert [r["kind"] for r in compare(a + rows_of("x", [(True, 1.0)], "move"), b[:3])] == ["reshape"]


def test_bench_compare_on_saved_runs(cli, tmp_path, tiny_folder):
    """A real run compared with itself is even on both measures; a folder that is not a run, or runs of
    different tasks, is a one-line error naming the folders, and nothing is saved."""
    for name, limit in (("a", 2), ("c", 1)):
        code, out, err = cli("bench", "shapes", "-e", "ddim", "-m", tiny_folder("sd1"), "--kinds", "recolour",
                             "--limit", limit, "-n", "2", "--save", tmp_path / name)
        assert code == 0, err
    code, out, err = cli("bench", "compare", tmp_path / "a", tmp_path / "a", "--save", tmp_path / "aa")
    assert code == 0, err
    [row] = json.loads((tmp_path / "aa" / "results.json").read_text())
    assert row["tasks"] == row["psnr_tasks"] == 2 and row["bg_psnr_diff"] == 0 and row["bg_psnr_verdict"] == "≈"
    assert (tmp_path / "aa" / "results.md").read_text().strip() == markdown([row])
    code, out, err = cli("bench", "compare", tmp_path / "a", tmp_path / "c", "--save", tmp_path / "ac")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "c") in err and "different tasks" in err
    assert not (tmp_path / "ac").exists()
    code, out, err = cli("bench", "compare", tmp_path / "a", tmp_path / "missing")
    assert code == 2 and "missing/rows.jsonl" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("bench", "compare", tmp_path / "a")
    assert code == 2 and "at least two" in err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "rows.jsonl").write_text('{"id": "recolour-000"}\n')
    code, out, err = cli("bench", "compare", tmp_path / "a", tmp_path / "odd")
    assert code == 2 and "line 1 is not a ShapesBench row" in err and len(err.strip().splitlines()) == 1


def test_the_committed_order_tables_are_current_with_their_runs():
    """benchmarks/results' order tables (docs/benchmarks.md quotes them) recomputed from the runs their
    command names: a run measured again without its comparison fails here."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("v4-order", "v4-order-g5", "v4-heldout-order"):
        saved = root / "benchmarks" / "results" / folder
        command = json.loads((saved / "command.json").read_text())["command"]
        assert command[:3] == ["diffedit", "bench", "compare"]
        runs = [root / run for run in command[3:command.index("--save")]]
        assert compare_folders(runs) == json.loads((saved / "results.json").read_text())

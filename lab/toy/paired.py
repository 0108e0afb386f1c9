"""Two ShapesBench runs compared task by task: is one engine (or setting) ahead of another beyond what
the tasks' spread can tell?

Both runs edited the same tasks, so each task gives one difference per measure: success (1, 0 or -1)
and background PSNR (dB). The mean difference and its 95 % interval come from resampling the tasks
(scipy's percentile bootstrap on the paired differences, seeded: a − b and b − a draw the same
resamples, so swapping the runs mirrors the interval). A measure is `>` where the whole interval is
above zero, `<` where it is below, `≈` where it holds zero: a mean gap of a few tenths of a dB over 40
tasks is often `≈`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

ROW_KEYS = {"id", "kind", "engine", "status", "success", "bg_psnr"}


class RunMismatch(ValueError):
    """The two runs did not edit the same tasks."""


def load_rows(folder: Path) -> list[dict]:
    """The per-task rows a `diffedit bench shapes --save FOLDER` run wrote (rows.jsonl)."""
    path = Path(folder) / "rows.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a folder saved by `diffedit bench shapes --save`)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}: line {number} is not JSON") from None
            if not isinstance(row, dict) or not ROW_KEYS <= row.keys():
                raise ValueError(f"{path}: line {number} is not a ShapesBench row (needs {', '.join(sorted(ROW_KEYS))})")
            rows.append(row)
    return rows


def interval(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of paired differences, by bootstrap over the tasks."""
    if np.allclose(differences, differences[0], rtol=0, atol=1e-9):  # every task the same: no spread to resample
        mean = float(differences.mean())
        return mean, mean
    result = stats.bootstrap((differences,), np.mean, n_resamples=resamples, confidence_level=0.95,
                             method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def verdict(low: float, high: float) -> str:
    return ">" if low > 0 else "<" if high < 0 else "≈"


def compare(a: list[dict], b: list[dict], resamples: int = 10_000) -> list[dict]:
    """Per task kind both runs hold: success and background PSNR of each, their paired differences
    (a - b) with 95 % intervals and verdicts. Tasks that failed to run in either are left out of both;
    a task kind whose task ids differ between the runs raises RunMismatch."""
    def by_kind(rows):
        kinds: dict[str, dict[str, dict]] = {}
        for row in rows:
            kinds.setdefault(row["kind"], {})[row["id"]] = row
        return kinds

    ka, kb = by_kind(a), by_kind(b)
    out = []
    for kind in sorted(ka.keys() & kb.keys()):
        ra, rb = ka[kind], kb[kind]
        if ra.keys() != rb.keys():
            raise RunMismatch(f"{kind}: the runs edited different tasks ({len(ra.keys() - rb.keys())} only in the "
                              f"first, {len(rb.keys() - ra.keys())} only in the second)")
        ids = sorted(i for i in ra if ra[i]["status"] == "ok" and rb[i]["status"] == "ok")
        if not ids:
            continue
        won = np.array([float(ra[i]["success"]) - float(rb[i]["success"]) for i in ids])
        # PSNR is infinite where an edit left the background's pixels identical: no finite difference
        both_finite = [i for i in ids if math.isfinite(ra[i]["bg_psnr"]) and math.isfinite(rb[i]["bg_psnr"])]
        gained = np.array([ra[i]["bg_psnr"] - rb[i]["bg_psnr"] for i in both_finite])
        success_ci = interval(won, resamples)
        row = {"a": ra[ids[0]]["engine"], "b": rb[ids[0]]["engine"], "kind": kind, "tasks": len(ids),
               "a_success_pct": round(100 * np.mean([ra[i]["success"] for i in ids]), 1),
               "b_success_pct": round(100 * np.mean([rb[i]["success"] for i in ids]), 1),
               "success_only_a": int((won > 0).sum()), "success_only_b": int((won < 0).sum()),
               "success_diff_pct": round(100 * float(won.mean()), 1),
               "success_ci_pct": [round(100 * v, 1) for v in success_ci], "success_verdict": verdict(*success_ci)}
        if len(gained):
            psnr_ci = interval(gained, resamples)
            row.update(psnr_tasks=len(gained),
                       a_bg_psnr=round(float(np.mean([ra[i]["bg_psnr"] for i in both_finite])), 2),
                       b_bg_psnr=round(float(np.mean([rb[i]["bg_psnr"] for i in both_finite])), 2),
                       bg_psnr_diff=round(float(gained.mean()), 2), bg_psnr_ci=[round(v, 2) for v in psnr_ci],
                       bg_psnr_a_ahead=int((gained > 0).sum()), bg_psnr_verdict=verdict(*psnr_ci))
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| a | b | task | tasks | success a / b % | only a / only b | a − b (95 % interval) | background a / b (dB) "
             "| a ahead | a − b dB (95 % interval) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        success = (f"{r['success_diff_pct']:+} [{r['success_ci_pct'][0]:+}, {r['success_ci_pct'][1]:+}] "
                   f"{r['success_verdict']}")
        if "bg_psnr_diff" in r:
            psnr = (f"{r['a_bg_psnr']} / {r['b_bg_psnr']} | {r['bg_psnr_a_ahead']} of {r['psnr_tasks']} | "
                    f"{r['bg_psnr_diff']:+} [{r['bg_psnr_ci'][0]:+}, {r['bg_psnr_ci'][1]:+}] {r['bg_psnr_verdict']}")
        else:
            psnr = "— | — | —"
        lines.append(f"| {r['a']} | {r['b']} | {r['kind']} | {r['tasks']} | {r['a_success_pct']} / {r['b_success_pct']} "
                     f"| {r['success_only_a']} / {r['success_only_b']} | {success} | {psnr} |")
    return "\n".join(lines)


def compare_folders(folders: list[Path]) -> list[dict]:
    """`compare` of each saved run with the next (`diffedit bench compare`); runs that did not edit the
    same tasks raise RunMismatch naming both folders."""
    runs = [load_rows(folder) for folder in folders]
    rows = []
    for (a, rows_a), (b, rows_b) in zip(zip(folders, runs), zip(folders[1:], runs[1:])):
        try:
            rows += compare(rows_a, rows_b)
        except RunMismatch as e:
            raise RunMismatch(f"{a} and {b}: {e}") from None
    return rows

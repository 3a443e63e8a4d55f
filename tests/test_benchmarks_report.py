"""BENCHMARKS.md is what `benchmarks/report.py` renders from the recorded results and NOTES.md, nothing else.

A hand edit of BENCHMARKS.md, or a NOTES.md change without re-rendering, would let the published figures and
the analysis drift from the recorded run. Re-render with:
``cd benchmarks && python -c "import json, report; from pathlib import Path;
Path('../BENCHMARKS.md').write_text(report.render(json.loads(Path('results.json').read_text())))"``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402


def test_benchmarks_md_is_the_rendered_results():
    results = json.loads((REPO / "benchmarks" / "results.json").read_text(encoding="utf-8"))
    assert (REPO / "BENCHMARKS.md").read_text(encoding="utf-8") == report.render(results)


def test_a_rerun_replaces_its_sections_and_says_when():
    """`report.merge_rerun`: a `run_all.py --only ...` run replaces only the sections it measured, and the
    rendered page names the rerun, its time and its load, so no ratio is read across two runs unsaid."""
    results = json.loads((REPO / "benchmarks" / "results.json").read_text(encoding="utf-8"))
    results.pop("reruns", None)
    rerun = {
        "command": "python benchmarks/run_all.py --only loss",
        "machine": {**results["machine"], "load_average_at_start": [9.0, 9.0, 9.0]},
        "started": "2030-01-01 00:00:00 UTC",
        "loss_memory": results["loss_memory"],
        "total_seconds": 1.0,
        "load_average_at_end": [8.0, 8.0, 8.0],
    }
    merged = report.merge_rerun(results, rerun)
    assert {k for k in merged if merged[k] != results.get(k)} == {"reruns"}  # same figures, one note more
    assert merged["reruns"] == [
        {
            "command": rerun["command"],
            "sections": ["loss_memory"],
            "started": "2030-01-01 00:00:00 UTC",
            "load_average_at_start": [9.0, 9.0, 9.0],
            "load_average_at_end": [8.0, 8.0, 8.0],
        }
    ]
    page = report.render(merged)
    assert "rerun by `python benchmarks/run_all.py --only loss` (sections loss_memory)" in page
    assert "started 2030-01-01 00:00:00 UTC" in page
    assert "rerun by" not in report.render(results)  # negative control
    # the same sections rerun again: one entry, the newest
    again = report.merge_rerun(merged, {**rerun, "started": "2031-01-01 00:00:00 UTC"})
    assert [x["started"] for x in again["reruns"]] == ["2031-01-01 00:00:00 UTC"]

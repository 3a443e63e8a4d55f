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

"""The README's performance table quotes a committed `dfserve bench --json` file, digit for digit.

Every figure in the table must come from the one JSON file the table names, so a re-run that
is committed without updating the table (or a table edited by hand) fails here.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def performance_section() -> str:
    start = README.index("## Performance")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def quoted_report() -> dict:
    names = re.findall(r"\(docs/benchmarks/([\w.-]+\.json)\)", performance_section())
    assert len(set(names)) == 1, f"the table must name exactly one bench file, names {names}"
    return json.loads((ROOT / "docs" / "benchmarks" / names[0]).read_text())


def numbers(values: list[float]) -> set[str]:
    """Each value as the README may round it: 0, 1, or 2 decimals."""
    return {f"{v:.{d}f}" for v in values for d in (0, 1, 2)}


def test_the_report_says_when_and_where_it_ran() -> None:
    report = quoted_report()
    assert datetime.fromisoformat(report["date"]).tzinfo is not None
    assert "CPU" in report["device"] or "GPU" in report["device"] or "cuda" in report["device"]


def test_every_figure_in_the_table_is_in_the_report() -> None:
    report = quoted_report()
    fps = report["aggregate_fps"]
    table_values = [
        report["single_stream_fps"], *fps.values(), report["batch_speedup_8"],
        report["kv_cache_speedup"], report["kv_cache_speedup_window16"], report["ttff_ms"],
        report["service_fps"], report["api_overhead"], report["ddim100_seconds"],
        report["dpmpp_2m_table"][str(report["defaults"]["steps"])]["seconds"],
        *report["mfu"].values(), report["peak_matmul_gflops"], report["model_gflops_per_frame"],
        report["research_loop_fps"], report["research_loop_gflops_per_frame"],
        *report["reference_loop_speedup"].values(), report["api_overhead_1"],
        report["service_fps_8"], report["engine_fps_8"],
        *(v for s in report["session_latency"].values() for v in s.values()),
    ]
    labels = {"100", "2", "4", "16", "8", "32", "50", "99"}  # steps, counts, p50 / p99
    allowed = numbers(table_values) | {str(k) for k in fps} | labels
    table = "\n".join(line for line in performance_section().splitlines() if line.startswith("|"))
    quoted = re.findall(r"\d+(?:\.\d+)?", table)
    assert quoted, "the performance table is missing"
    stray = [q for q in quoted if q not in allowed]
    assert not stray, f"figures in the README's table that the bench file does not hold: {stray}"

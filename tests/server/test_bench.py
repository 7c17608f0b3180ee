"""`dfserve bench` runs end to end (engine, samplers, the real API) and reports every figure of
DESIGN §8. Values are timings, so only their presence and sanity are checked, never speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
from datetime import datetime
from pathlib import Path

from tests.e2e.conftest import DFSERVE, REDIS_URL

FIGURES = (
    "single_stream_fps", "kv_cache_speedup", "kv_cache_speedup_window16", "batch_speedup_8",
    "ttff_ms", "service_fps", "api_overhead", "ddim100_seconds",
    "api_overhead_1", "service_fps_8", "engine_fps_8", "api_overhead_cpu",
)  # fmt: skip
SESSION_FIGURES = ("p50_ms", "p99_ms", "fps", "total_fps")
# model FLOP utilisation and the research loop (bench_mfu.py, bench_df.py)
MODEL_FIGURES = ("model_gflops_per_frame", "peak_matmul_gflops", "research_loop_fps",
                 "research_loop_gflops_per_frame")  # fmt: skip


def test_bench_reports_every_figure(tiny_bundle_dir: Path) -> None:
    # The service figures run separate `dfserve api` and `dfserve worker` processes on the
    # real Redis (under a prefix of their own, deleted afterwards).
    command = [str(DFSERVE), "bench", "--model", str(tiny_bundle_dir), "--quick", "--json",
               "--redis-url", REDIS_URL]  # fmt: skip
    # One torch thread: on a shared 2-core machine two threads spin against each other and
    # every other job, and the tiny model's rows run ~20x slower; the figures are the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True,
                         env=env)  # fmt: skip
    report = json.loads(out.stdout)
    assert report["model"] == "tiny" and "CPU" in report["device"]
    assert datetime.fromisoformat(report["date"]).tzinfo is not None  # docs/benchmarks/ needs it
    for key in FIGURES:
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    assert set(report["aggregate_fps"]) == {"1", "8"}
    assert all(v > 0 for v in report["aggregate_fps"].values())
    table = report["dpmpp_2m_table"]
    assert table and all(math.isfinite(row["psnr_vs_ddim100"]) for row in table.values())
    assert report["service_torch_threads"] >= 1
    cpu = report["cpu_ms_per_frame_8"]  # from /proc: the test machine is Linux
    assert set(cpu) == {"worker", "api", "engine"} and all(v >= 0 for v in cpu.values()), cpu
    sessions = report["session_latency"]
    assert set(sessions) == {"1", "4", "16"}
    for n, figures in sessions.items():
        for key in SESSION_FIGURES:
            assert math.isfinite(figures[key]) and figures[key] > 0, (n, key, figures[key])
        assert figures["p50_ms"] <= figures["p99_ms"], (n, figures)
    for key in MODEL_FIGURES:
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    assert set(report["mfu"]) == {"1", "8", "32"}
    assert set(report["reference_loop_speedup"]) == {"single_stream", "8_rollouts"}
    for group in ("mfu", "reference_loop_speedup"):
        assert all(math.isfinite(v) and v > 0 for v in report[group].values()), report[group]
    # the research loop gives the engine's frames up to float rounding (their windows agree)
    assert report["engine_vs_research_loop_max_abs_diff"] < 1e-3

"""The hardware a run used, in words, for training summaries and benchmark reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    threads, cores = torch.get_num_threads(), os.cpu_count()
    return f"{threads} CPU threads ({cores} cores visible), {cpu_model_name()}"

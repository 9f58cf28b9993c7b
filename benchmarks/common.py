"""What every benchmark script here shares: progress on stderr and the name of the device."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["log", "device_name", "emit"]


def log(message: str) -> None:
    """Progress on stderr, so stdout holds the report alone."""
    print(message, file=sys.stderr, flush=True)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({platform.processor() or 'unknown'}, {os.cpu_count()} cores)"


def emit(report: str, output: Path | None) -> None:
    """Print the report; also append it to ``output`` when given."""
    print(report)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("a") as handle:
            handle.write(report + "\n\n")

"""What every benchmark's JSON report shares: the machine it ran on, and a safe way to write it.

`--json FILE` follows the project's output rules (`paligemma.outputs`): the target is checked
when the arguments are read, before any long work; an existing file is replaced only with
`--force`, and only if it is a previous benchmark report (a JSON object with a "benchmark" key);
each save writes a temporary file and renames it into place, so an interrupted run leaves the
previous save, not half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from paligemma import dispatch, outputs

KIND = "benchmark-report"


def machine() -> dict[str, Any]:
    """The CPU (model, cores, PyTorch's capability, the flags that matter for matmuls), RAM and
    library versions."""
    cpu = dispatch.Cpu.detect()
    info: dict[str, Any] = {
        "cpu": cpu.model,
        "cores": os.cpu_count(),
        "isa": cpu.capability,  # torch.backends.cpu.get_cpu_capability()
        "flags": cpu.matmul_flags(),  # the /proc/cpuinfo flags that matter for matmuls
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def add_json_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--json FILE (default `default`: none, the report is only printed) and --force."""
    parser.add_argument("--json", metavar="FILE", default=default,
                        help="also write the figures to FILE as JSON"
                        + (f" (default: {default})" if default else ""))
    parser.add_argument("--force", action="store_true",
                        help="replace FILE if it is a previous benchmark report")


class JsonReport:
    """The `--json` target of one run: checked when made, rewritten whole on each `save`."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace):
        self.benchmark = Path(parser.prog).stem
        self.path = Path(args.json) if args.json else None
        self.replace = args.force
        if self.path is not None:
            try:
                outputs.check(self.path, KIND, self.replace)
            except outputs.OutputError as e:
                parser.error(str(e))

    def save(self, report: dict[str, Any]) -> None:
        """Writes {"benchmark": name, **report}; later saves of this run replace earlier ones."""
        if self.path is None:
            return
        with outputs.atomic(self.path, KIND, self.replace) as tmp:
            tmp.write_text(json.dumps({"benchmark": self.benchmark, **report}, indent=2) + "\n")
        self.replace = True

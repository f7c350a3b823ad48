"""Where and how a result was produced: recorded in every results document so a table can name its run."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_CLI_SCRIPTS = ("cli.py", "__main__.py")  # ``python -m a2ats_tools.cli`` runs the same command as ``a2ats``


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the checkout the package runs from (``+dirty`` if tracked files differ), or None if installed."""
    where = where or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, with the program shortened to its name (``a2ats eval ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = Path(argv[0]).name
    return shlex.join(["a2ats" if prog in _CLI_SCRIPTS else prog, *argv[1:]])


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: on a shared machine, how busy it was while the run timed things."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_provenance() -> dict[str, Any]:
    """Date, machine (and its load), versions, commit and command of this process, for a results document."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": _load_average(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": command_line(),
    }

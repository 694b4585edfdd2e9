"""What machine a run ran on, recorded beside its results (``machine.json`` in the run directory).

Same seed and config give the same numbers on one machine, not across machines: torch picks
its CPU kernels by instruction set (AVX2, AVX-512, ...), and kernels that add in another
order round differently, so training follows another path (docs/RELIABILITY.md). A result
file that does not say which CPU made it cannot be paired with another one safely, so every
stage appends what it runs on to ``machine.json``, one entry per start; a resumed run that
moved to another machine says so in its log.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ntp_ssl.io import atomic_write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ntp_ssl.machine")

MACHINE_FILE = "machine.json"
CPUINFO = Path("/proc/cpuinfo")  # Linux's; where it is missing, platform's names are used
# the instruction-set flags that change which CPU kernels torch and oneDNN run
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
# what must agree for two runs to be expected to give the same numbers (not the start time)
IDENTITY_KEYS = ("cpu", "cpu_capability", "kernel_flags", "torch", "threads", "device")
# compared only where both entries have them (entries written before 2026-12-06 do not). Two
# sessions with equal IDENTITY_KEYS protected the same seed into other weights while pretraining
# and scratch reproduced bit for bit: a virtual machine's model name can be the bare
# "Intel(R) Xeon(R) Processor" on CPUs of other generations, and the libraries protection alone
# uses (faiss's k-means, scikit-learn, numpy) are version ranges in pyproject.toml, so either can
# differ unseen; both are recorded now
CPU_ID_KEYS = ("cpu_id", "cpu_cache")
OPTIONAL_IDENTITY_KEYS = (*CPU_ID_KEYS, "libraries")
# the numeric libraries besides torch whose versions can change a run's numbers
NUMERIC_LIBRARIES = ("numpy", "scipy", "scikit-learn", "faiss-cpu", "lightly")
# cpuinfo's lines that name the CPU beyond its model name, and the fields they fill
_CPU_ID_LINES = {"cpu family": "family", "model": "model", "stepping": "stepping"}


def _cpuinfo(path: Path = CPUINFO) -> tuple[str | None, list[str], str | None, str | None]:
    """(model name, the KERNEL_FLAGS it has, "family F model M stepping S", cache size) from
    Linux's cpuinfo, of the first processor; (None, [], None, None) elsewhere."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, [], None, None
    model, flags, cache, ids = None, None, None, {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("processor", "model name") and model is not None:
            break  # the first processor's lines are read; every processor repeats them
        if key == "model name":
            model = value
        elif key == "flags":
            flags = set(value.split())
        elif key == "cache size":
            cache = value
        elif key in _CPU_ID_LINES:
            ids[_CPU_ID_LINES[key]] = value
    cpu_id = " ".join(f"{field} {ids[field]}" for field in _CPU_ID_LINES.values() if field in ids) or None
    return model, [flag for flag in KERNEL_FLAGS if flag in (flags or ())], cpu_id, cache


def library_versions() -> dict[str, str | None]:
    """The installed version of each of NUMERIC_LIBRARIES (None where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=None)
def native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has bfloat16 instructions (AMX or AVX-512 BF16), which oneDNN uses for
    bfloat16 convolutions and matrix products; without them bfloat16 is emulated and slower."""
    flags = _cpuinfo(cpuinfo)[1]
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_model(*, cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (Linux's cpuinfo; elsewhere what ``platform`` knows)."""
    return _cpuinfo(cpuinfo)[0] or _platform_cpu()


def _platform_cpu() -> str:
    return platform.processor() or platform.machine() or "unknown"


def logical_cpus() -> int | None:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def describe_machine(device: torch.device | str = "cpu", *, cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """The facts of this machine that decide a run's float results (no time stamp)."""
    import torch  # here, not at the top: runs.py reads MACHINE_FILE and stays free of torch

    model, flags, cpu_id, cache = _cpuinfo(cpuinfo)
    device = torch.device(device)
    return {
        "cpu": model or _platform_cpu(),
        "cpu_id": cpu_id,
        "cpu_cache": cache,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_flags": flags,
        "logical_cpus": logical_cpus(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "libraries": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": device.type if device.type != "cuda" else f"cuda: {torch.cuda.get_device_name(device)}",
    }


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two entries describe machines expected to give the same numbers."""
    return all(a.get(key) == b.get(key) for key in IDENTITY_KEYS) and all(
        a[key] == b[key] for key in OPTIONAL_IDENTITY_KEYS if a.get(key) is not None and b.get(key) is not None)


def cpu_label(entry: dict[str, Any]) -> str:
    """The CPU's model name, with its family/model/stepping and cache where recorded."""
    details = [entry["cpu_id"]] if entry.get("cpu_id") else []
    details += [f"cache {entry['cpu_cache']}"] if entry.get("cpu_cache") else []
    return f"{entry.get('cpu')} [{', '.join(details)}]" if details else str(entry.get("cpu"))


def read_machines(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``run_dir``'s machine.json, oldest first ([] when there is none or it is unreadable)."""
    path = Path(run_dir) / MACHINE_FILE
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def record_machine(run_dir: Path, device: torch.device | str = "cpu", *, argv: list[str] | None = None,
                   cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """Append this start's machine to ``run_dir``/machine.json and return the entry; warn when
    an earlier start of the same run directory ran on a machine that gives other numbers."""
    run_dir = Path(run_dir)
    earlier = read_machines(run_dir)
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "command": " ".join(sys.argv if argv is None else argv)[:300],
             **describe_machine(device, cpuinfo=cpuinfo)}
    others = [e for e in earlier if not same_machine(e, entry)]
    if others:
        before = others[-1]
        log.warning("run directory %s was started before on another machine (%s, torch %s, %s threads); what "
                    "it trained there can differ from what this machine (%s, torch %s, %s threads) trains from "
                    "the same seed: pair results of one machine only", run_dir, cpu_label(before),
                    before.get("torch"), before.get("threads"), cpu_label(entry), entry["torch"], entry["threads"])
        moved = {name: (version, entry["libraries"].get(name))
                 for name, version in (before.get("libraries") or {}).items()
                 if version != entry["libraries"].get(name)}
        if moved:
            log.warning("libraries changed since that start: %s", ", ".join(
                f"{name} {old} -> {new}" for name, (old, new) in sorted(moved.items())))
    atomic_write_json(run_dir / MACHINE_FILE, earlier + [entry])
    return entry

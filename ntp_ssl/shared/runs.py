"""Run directories: what a run writes, and how a rerun finds its own earlier work.

A run directory belongs to one config. The first run writes ``run_config.json`` (the
resolved config less the keys that do not change results); a rerun with the same config
resumes there, and a rerun with a different config is refused instead of mixing two runs
or overwriting the first one's artifacts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from ntp_ssl.config import to_plain
from ntp_ssl.errors import ConfigError
from ntp_ssl.io import atomic_write_json

log = logging.getLogger("ntp_ssl")

# Keys that change how a run is shown or where it lives, not what it computes.
PRESENTATION_KEYS = ("trainer.progress", "trainer.threads", "paths", "resume", "resume_from", "run_name", "evaluate")


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if rest:
        if isinstance(tree[head], dict):
            _drop(tree[head], rest)
    else:
        del tree[head]


def fingerprint(cfg: Any, ignore: Iterable[str] = PRESENTATION_KEYS) -> dict:
    tree = to_plain(cfg)
    for key in ignore:
        _drop(tree, key)
    return tree


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def holds_work(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run made besides its bookkeeping.

    Bookkeeping is ``run_config.json``, Hydra's ``.hydra/`` folder, ``*.log`` files and a
    ``tb/`` folder without event files: what a run that stopped at a start-up error
    (a bad value, a missing file) leaves behind. Such a run directory can be claimed by a
    corrected config; one that holds checkpoints, results or TensorBoard events cannot.
    """
    for entry in run_dir.iterdir():
        name = entry.name
        if name in ("run_config.json", ".hydra") or name.startswith(".tmp-") or (entry.is_file() and name.endswith(".log")):
            continue
        if name == "tb" and entry.is_dir() and not any(p.is_file() for p in entry.rglob("*")):
            continue
        return True
    return False


def claim_run_dir(run_dir: Path, cfg: Any, *, ignore: Iterable[str] = PRESENTATION_KEYS) -> bool:
    """Make ``run_dir`` this config's; return True when it already held the same config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run_config.json"
    current = fingerprint(cfg, ignore)
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous is not None and previous != current and not holds_work(run_dir):
            # The earlier run stopped at start-up (a bad value or path) and left nothing but
            # bookkeeping: the corrected command takes the run directory over.
            log.info("run directory %s held only a run that stopped at start-up; reusing it", run_dir)
            atomic_write_json(path, current)
            return False
        if previous is not None and previous != current:
            diff = _first_difference(previous, current) or "config"
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run with a different config ({diff}); "
                "pass run_name=NEW_NAME or paths.root=ELSEWHERE, or remove that folder"
            )
        return previous is not None
    atomic_write_json(path, current)
    return False

"""Run directories: what a run writes, and how a rerun finds its own earlier work.

A run directory belongs to one config. The first run writes ``run_config.json`` (the
resolved config less the keys that do not change results); a rerun with the same config
resumes there, and a rerun with a different config is refused instead of mixing two runs
or overwriting the first one's artifacts. A run directory also belongs to one process at a
time: an exclusive lock on ``.lock`` (``flock``, released by the OS when the process ends,
however it ends) is held for the run; a second process gets a one-line error naming the
holder, or waits for it when asked to (the shared cache of the default encoder).
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ntp_ssl.config import REFERENCE_EVAL_BATCH, REFERENCE_PRECISION, to_plain
from ntp_ssl.errors import ConfigError
from ntp_ssl.io import atomic_write_json
from ntp_ssl.shared.machine import MACHINE_FILE

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


def without_new_nulls(current: Any, previous: Any) -> Any:
    """``current`` without the keys ``previous`` lacks whose value is None: an option added
    later with a null default (off) leaves the runs made before it resumable."""
    if not (isinstance(current, dict) and isinstance(previous, dict)):
        return current
    return {key: without_new_nulls(value, previous.get(key)) for key, value in current.items()
            if key in previous or value is not None}


#: Options added after runs existed whose absence from an older run's config means another
#: value than today's default (dotted key -> the value such a run was made with). Unlike a
#: null default (above), these change the numbers: channels-last came on by default. A run
#: made before ``sweep.precision`` and ``sweep.eval_batch_size`` existed ran the reference
#: attacker (float32, validation and test forwards of 512 images).
LEGACY_VALUES: dict[str, Any] = {"trainer.channels_last": False, "sweep.precision": REFERENCE_PRECISION,
                                 "sweep.eval_batch_size": REFERENCE_EVAL_BATCH}


def _legacy_slots(tree: Any):
    """(section dict, leaf key, legacy value) for each :data:`LEGACY_VALUES` key whose section
    ``tree`` holds."""
    for dotted, value in LEGACY_VALUES.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            yield node, leaf, value


def with_legacy_values(previous: Any) -> Any:
    """A copy of an older run's config with the :data:`LEGACY_VALUES` it lacks filled in
    (where the section that holds them exists), so it compares as what it was made with."""
    if not isinstance(previous, dict):
        return previous
    tree = copy.deepcopy(previous)
    for node, leaf, value in _legacy_slots(tree):
        node.setdefault(leaf, value)
    return tree


def without_legacy_values(tree: dict) -> dict:
    """``tree`` (changed in place and returned) less each :data:`LEGACY_VALUES` key set to its
    legacy value: a cache key that then matches the one computed before the option existed."""
    for node, leaf, value in list(_legacy_slots(tree)):
        if leaf in node and node[leaf] == value:
            del node[leaf]
    return tree


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


INPUTS_KEY = "inputs"  # run_config.json: the content digests of the files the run reads
LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # run directories this process holds: file descriptors of their locks


def lock_run_dir(run_dir: Path, *, wait: bool = False) -> None:
    """Hold ``run_dir`` for this process (re-entrant). Held by another process: a ConfigError
    naming it, or with ``wait``, block until it is released."""
    key = Path(run_dir).resolve()
    if key in _HELD:
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(f"run directory {str(run_dir)!r} is in use by another run ({holder}); wait for it "
                              "to finish or pass run_name=NEW_NAME") from None
        log.info("waiting for another run to release %s", run_dir)
        fcntl.flock(fd, fcntl.LOCK_EX)
    holder = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Let other processes have ``run_dir`` again (a no-op when this process does not hold it)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds_work(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run made besides its bookkeeping.

    Bookkeeping is ``run_config.json``, ``machine.json``, Hydra's ``.hydra/`` folder, ``*.log``
    files and a ``tb/`` folder without event files: what a run that stopped at a start-up error
    (a bad value, a missing file) leaves behind. Such a run directory can be claimed by a
    corrected config; one that holds checkpoints, results or TensorBoard events cannot.
    """
    for entry in run_dir.iterdir():
        name = entry.name
        bookkeeping = name in ("run_config.json", MACHINE_FILE, ".hydra", LOCK_NAME) or name.startswith(".tmp-")
        if bookkeeping or (entry.is_file() and name.endswith(".log")):
            continue
        if name == "tb" and entry.is_dir() and not any(p.is_file() for p in entry.rglob("*")):
            continue
        return True
    return False


def claim_run_dir(run_dir: Path, cfg: Any, *, ignore: Iterable[str] = PRESENTATION_KEYS,
                  inputs: dict[str, str] | None = None) -> bool:
    """Make ``run_dir`` this config's and this process's (:func:`lock_run_dir`); return True
    when it already held the same config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir)
    path = run_dir / "run_config.json"
    current = fingerprint(cfg, ignore)
    if inputs:
        current[INPUTS_KEY] = dict(inputs)
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        if not isinstance(previous, dict):
            # damaged or hand-edited: which config made the work here is unknown, so it is
            # neither resumed nor overwritten
            if holds_work(run_dir):
                raise ConfigError(f"run directory {str(run_dir)!r} holds work but its run_config.json is not a "
                                  "config; pass run_name=NEW_NAME or paths.root=ELSEWHERE, or remove that folder")
            log.info("run directory %s held an unreadable run_config.json and no work; reusing it", run_dir)
            atomic_write_json(path, current)
            return False
        if INPUTS_KEY not in previous:
            current.pop(INPUTS_KEY, None)  # a run directory made before inputs were recorded
        previous = with_legacy_values(previous)
        current = without_new_nulls(current, previous)
        if previous != current and not holds_work(run_dir):
            # The earlier run stopped at start-up (a bad value or path) and left nothing but
            # bookkeeping: the corrected command takes the run directory over.
            log.info("run directory %s held only a run that stopped at start-up; reusing it", run_dir)
            atomic_write_json(path, current)
            return False
        if previous != current:
            diff = first_difference(previous, current) or "config"
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run with a different config ({diff}); "
                "pass run_name=NEW_NAME or paths.root=ELSEWHERE, or remove that folder"
            )
        return True
    atomic_write_json(path, current)
    return False

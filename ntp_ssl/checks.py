"""Checks of values that several layers take from the user: one rule, one message each."""

from __future__ import annotations

import difflib
import json
import numbers
from pathlib import Path

from ntp_ssl.errors import CheckpointError, ConfigError, DataError
from ntp_ssl.io import pending_path, roll_forward

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512


def is_int(value: object) -> bool:
    """An integer that is not a bool (True is an int to Python, never to a config)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_image_size(value: object, key: str = "image_size") -> int:
    """``value`` as an int in [8, 512] (square images), or a ConfigError naming it."""
    if not is_int(value) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ConfigError(f"{key}={value!r} must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (e.g. 32)")
    return int(value)


def check_run_name(value: object) -> str:
    """``value`` as one safe path component: a run directory is ``paths.root/STAGE/RUN_NAME`` and
    must not land elsewhere (``..``, a separator) or be the stage folder itself (empty)."""
    name = str(value) if value is not None else ""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"run_name={name!r} must be one folder name (no '/', no '..', not empty), e.g. "
                          "run_name=my-run")
    return name


def check_channels(value: object, key: str = "channels") -> int:
    """``value`` as 1 (grey) or 3 (RGB), or a ConfigError naming it."""
    if not is_int(value) or value not in (1, 3):
        raise ConfigError(f"{key}={value!r} must be 1 or 3 (grey or RGB)")
    return int(value)


#: The domain names ``load_domain`` knows (ntp_ssl/data/load.py), here so that a config's
#: domains are checked before torch is imported.
EMBEDDED_DOMAINS = ("mnist", "optdigits", "syndigits", "mnistm")
TORCHVISION_DOMAINS = ("tv-mnist", "usps", "svhn", "cifar10", "stl10")
PATH_FORMS = ("folder:/path/to/images", "npz:/path/to/file.npz")
ALL_FORMS = EMBEDDED_DOMAINS + TORCHVISION_DOMAINS + PATH_FORMS


def check_domain_spec(spec: object, key: str | None = None) -> str:
    """``spec`` stripped, when it names a domain ``load_domain`` can read: an embedded or
    torchvision name (any case) or ``folder:PATH`` / ``npz:PATH``; otherwise a DataError naming
    it (and ``key``, the config entry it came from), with the closest name when there is one."""
    where = f"{key}: " if key else ""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"{where}domain must be a non-empty string, got {spec!r}; valid: {', '.join(ALL_FORMS)}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if (rest and kind.lower() in ("folder", "npz")) or spec.lower() in EMBEDDED_DOMAINS + TORCHVISION_DOMAINS:
        return spec
    close = difflib.get_close_matches(spec.lower(), EMBEDDED_DOMAINS + TORCHVISION_DOMAINS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"{where}unknown domain {spec!r}{hint}; valid: {', '.join(ALL_FORMS)}")


def domain_key(spec: object) -> str:
    """What a domain spec names, for comparing specs: embedded and torchvision names ignore case
    and surrounding spaces (the loader does), ``folder:``/``npz:`` compare resolved paths."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if sep and rest and kind.lower() in ("folder", "npz"):
        return f"{kind.lower()}:{Path(rest).expanduser().resolve()}"
    return text.lower()


def check_source_and_targets(source: object, targets, key: str = "data.targets") -> None:
    """No domain is both the source and a target, and no target is listed twice, by what
    the specs name (``MNIST`` is ``mnist``)."""
    seen: dict[str, object] = {}
    for target in targets:
        name = domain_key(target)
        if name == domain_key(source):
            raise ConfigError(f"{key} entry {target!r} is data.source={source!r}; a domain cannot be both")
        if name in seen:
            raise ConfigError(f"{key} lists {seen[name]!r} and {target!r}, the same domain twice; list it once")
        seen[name] = target


#: What a run directory given as a checkpoint holds, in the order it is looked for.
RUN_CHECKPOINT_NAMES = ("protected.safetensors", "encoder.safetensors")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a .safetensors file, its .json, or a run directory holding encoder.safetensors.

    Path logic only (no torch): the command line checks its input checkpoints with it before
    importing anything heavy, and every stage again before reading them. A save killed after
    its commit (see ntp_ssl/shared/checkpoint.py) is finished here, so that every stage, not
    only the loader, finds the checkpoint that was committed."""
    path = Path(path).expanduser()
    candidates = _candidate_files(path)
    for candidate in candidates:
        if _finish_committed_save(candidate).exists():
            return candidate
    if path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} holds no encoder.safetensors or protected.safetensors")
    raise CheckpointError(f"checkpoint {str(candidates[0])!r} does not exist; give a .safetensors file or a run "
                          "directory")


def checkpoint_key(path: str | Path) -> str:
    """The file a checkpoint argument names, resolved, for telling two arguments apart: a run
    directory, the file in it and its .json give one key. No side effects, and no error for a
    path that does not exist (the lookup above judges that)."""
    path = Path(path).expanduser()
    candidates = _candidate_files(path)
    present = [c for c in candidates if c.exists() or pending_path(c).exists()]
    named = present[0] if present else path if path.is_dir() else candidates[0]
    return str(named.resolve())


def _candidate_files(path: Path) -> list[Path]:
    """The .safetensors files a checkpoint argument may name, in the order they are looked for:
    a run directory's (RUN_CHECKPOINT_NAMES), or the file itself (its .json names it too)."""
    if path.is_dir():
        return [path / name for name in RUN_CHECKPOINT_NAMES]
    return [path.with_suffix(".safetensors") if path.suffix == ".json" else path]


def resolve_results_path(run: str | Path) -> Path:
    """The results.csv a report gathers: a run directory's, or the file itself; a ConfigError
    naming ``run`` when there is none (checked by the command line before torch is imported)."""
    path = Path(run).expanduser()
    results = path / "results.csv" if path.is_dir() else path
    if not results.is_file():
        raise ConfigError(f"run {str(run)!r} has no results.csv; give run directories written by evaluate or protect")
    return results


MAX_METADATA_BYTES = 64 << 20  # a checkpoint's .json; the loader refuses a bigger one too


def _finish_committed_save(path: Path) -> Path:
    """``path``, after renaming ``NAME.pending`` onto it where its ``.json`` names the pending
    file's hash (a save killed between its commit and its rename). Anything else is left for
    the loader to judge: it checks every hash again and names what is wrong."""
    meta_path = path.with_suffix(".json")
    if not pending_path(path).is_file() or not meta_path.is_file():
        return path
    try:
        if meta_path.stat().st_size > MAX_METADATA_BYTES:
            return path
        expected = json.loads(meta_path.read_text()).get("sha256")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return path
    if roll_forward(path, expected if isinstance(expected, str) else None) == pending_path(path):
        raise CheckpointError(f"checkpoint {str(path)!r} was saved up to its last rename and its folder is read-only; "
                              f"rename {pending_path(path).name} to {path.name} to finish it")
    return path

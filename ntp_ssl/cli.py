"""The ``ntp-ssl`` command: one Hydra app per stage over the packaged ``configs/``.

``ntp-ssl STAGE [KEY=VALUE ...]`` picks the stage, then hands the rest of the command line
to Hydra (overrides, ``-m`` multirun, ``--help``, ``--cfg job``). User errors are printed
as one line, ``error: ...``, with exit code 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from ntp_ssl import __version__

STAGES: dict[str, str] = {
    "pretrain": "pretrain an encoder (SimCLR, MoCo v2, supervised) on the source domain",
    "protect": "Non-Transferable Pruning (ADMM) of an encoder; with no arguments, the whole main job",
    "evaluate": "SLC sweeps and SLC-AUC of encoders on target domains against training from scratch",
    "report": "gather run directories into one comparison table and figure",
    "domains": "list the domains with sizes and class counts; write a contact sheet PNG",
}

USAGE = """usage: ntp-ssl STAGE [KEY=VALUE ...] [-m] [--help]

Non-Transferable Pruning for self-supervised and supervised encoders.

stages:
{stages}

Each stage is a Hydra app: override any config key with KEY=VALUE (a misspelt key is an
error), sweep with -m (e.g. `ntp-ssl pretrain -m seed=0,1,2`), and see a stage's config
with `ntp-ssl STAGE --help`. Runs are written below runs/STAGE/RUN_NAME.

examples:
  ntp-ssl protect                                  # the main job on the embedded digits
  ntp-ssl pretrain method.name=moco optim.epochs=20
  ntp-ssl evaluate checkpoints=[runs/protect/.../protected.safetensors] data.targets=[usps] data.root=~/data
  ntp-ssl domains
"""

def config_dir() -> Path:
    """The packaged configs folder (``configs/`` of the repository, installed as ntp_ssl.configs)."""
    import ntp_ssl.configs

    return Path(ntp_ssl.configs.__file__).resolve().parent


def stage_runner(stage: str) -> Callable:
    """The function that runs a stage: ``runner(cfg, run_dir) -> dict``."""
    if stage == "pretrain":
        from ntp_ssl.pretrain.stage import run_pretrain as runner
    elif stage == "protect":
        from ntp_ssl.pipeline import run_main_job as runner
    elif stage == "evaluate":
        from ntp_ssl.evaluate.stage import run_evaluate as runner
    elif stage == "report":
        from ntp_ssl.evaluate.stage import run_report as runner
    elif stage == "domains":
        from ntp_ssl.data.stage import run_domains as runner
    else:  # pragma: no cover - guarded by main()
        raise KeyError(stage)
    return runner


def _run_in_hydra(stage: str, cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from ntp_ssl.errors import NtpSslError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return stage_runner(stage)(cfg, run_dir)
    except NtpSslError as exc:
        logging.getLogger("ntp_ssl").debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a read-only folder, a full disk, an unwritable cache: the system said no
        logging.getLogger("ntp_ssl").debug("system error", exc_info=True)
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}; free space or choose a writable paths.root / "
              "paths.cache_dir, then run the same command again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume from {run_dir}", file=sys.stderr)
        sys.exit(130)


HYDRA_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-p", "--package", "-i", "--info",
               "--resolve", "-sc", "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd",
               "--config-dir", "--run", "-r", "--experimental-rerun", "--version")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def _with_list_hint(message: str) -> str:
    """Hydra's refusal of ``KEY=value`` or ``KEY=a,b`` for a list, with the spelling it wanted
    (``checkpoints=a.safetensors`` is the usual slip for ``checkpoints=[a.safetensors]``)."""
    found = re.search(r"override (\S+?)=(\S*?):? Invalid value assigned: str is not a ListConfig", message)
    if found:
        key, value = found.groups()
        return f"{message.rstrip('.')}; a list is written in brackets: {key}=[{value}]"
    # KEY=a,b: Hydra's advice (brackets, quotes or -m) is on lines the one-line error drops
    found = re.match(r"Ambiguous value for argument '([^=']+)=([^']*)'", message)
    if found:
        key, value = found.groups()
        return f"{message}; for a list write {key}=[{value}]; to sweep over the values, add -m"
    return message


def precheck(stage: str, overrides: list[str]) -> str | None:
    """Compose the config as Hydra will, check its values, and create the run directory; a problem
    becomes one line.

    Hydra itself reports a bad override in several lines (exit 1) and fails on an unusable run
    directory with a traceback; checked here first, both are one ``error:`` line (exit 2).
    Skipped when Hydra's own flags are given (multirun, help, ...), which Hydra handles.
    """
    if any(arg.split("=")[0] in HYDRA_FLAGS for arg in overrides):
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ntp_ssl.checks import check_run_name, resolve_checkpoint_path
    from ntp_ssl.config import STAGE_VALIDATORS, input_checkpoints

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=stage):
            cfg = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
            check_run_name(cfg.run_name)  # before the run directory below is made
            run_dir = Path(str(cfg.hydra.run.dir))
        if stage in STAGE_VALIDATORS:
            # the stage's own checks (it runs them again): a bad value is one line within a
            # second, not after the 5-7 s of importing torch, and no run directory is made for it
            with open_dict(cfg):
                del cfg["hydra"]
            STAGE_VALIDATORS[stage](cfg)
            for checkpoint in input_checkpoints(stage, cfg):
                resolve_checkpoint_path(checkpoint)  # a mistyped path, likewise
    except Exception as exc:  # Hydra's composition and override-parsing errors, the stage's checks
        message = _first_line(exc)
        if exc.__cause__ is not None:
            message = f"{message.rstrip('.')}: {_first_line(exc.__cause__)}"
        return _with_list_hint(message)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the run directory {str(run_dir)!r} ({exc.strerror}); set paths.root to a writable folder"
    from ntp_ssl.errors import NtpSslError
    from ntp_ssl.shared.runs import lock_run_dir

    if os.environ.get("RANK", "0") != "0":  # torchrun's other processes: rank 0 holds the run directory
        return None
    try:  # held from here, before Hydra writes its files there, to the stage's end (re-entrant)
        lock_run_dir(run_dir)
    except NtpSslError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_lines = "\n".join(f"  {name:<10} {text}" for name, text in STAGES.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages=stage_lines))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ntp-ssl {__version__}")
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; choose one of: {', '.join(STAGES)} (see ntp-ssl --help)", file=sys.stderr)
        return 2

    import hydra

    from ntp_ssl.config import register_schemas

    register_schemas()

    def task(cfg) -> None:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
        _run_in_hydra(stage, cfg)

    problem = precheck(stage, argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    app = hydra.main(config_path=str(config_dir()), config_name=stage, version_base="1.3")(task)
    saved_argv = sys.argv
    sys.argv = [f"ntp-ssl-{stage}", *argv[1:]]
    try:
        app()
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":  # python -m ntp_ssl.cli (torchrun uses this)
    sys.exit(main())

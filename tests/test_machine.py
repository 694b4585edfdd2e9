"""machine.json: which machine a run's numbers came from (ntp_ssl/shared/machine.py)."""

from __future__ import annotations

import json
import logging

import torch

from ntp_ssl.shared.machine import KERNEL_FLAGS, describe_machine, read_machines, record_machine, same_machine
from ntp_ssl.shared.runs import holds_work

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 sha_ni
processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 sha_ni
"""


def _cpuinfo(tmp_path, text=CPUINFO):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_describe_machine_reads_the_cpu_model_and_the_kernel_flags(tmp_path):
    described = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path))
    assert described["cpu"] == "Test CPU 9000"
    assert described["kernel_flags"] == ["avx2", "avx512f", "avx512_bf16"]  # in KERNEL_FLAGS order, others dropped
    assert described["torch"] == torch.__version__ and described["threads"] == torch.get_num_threads()
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["device"] == "cpu"
    json.dumps(described)  # plain JSON


def test_describe_machine_without_cpuinfo_still_names_a_cpu(tmp_path):
    described = describe_machine("cpu", cpuinfo=tmp_path / "absent")
    assert isinstance(described["cpu"], str) and described["cpu"]
    assert described["kernel_flags"] == []


def test_kernel_flags_are_read_from_the_first_processor_only(tmp_path):
    text = "model name : A\nflags : avx2\nmodel name : B\nflags : avx2 amx_tile\n"
    described = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path, text))
    assert described["cpu"] == "A" and described["kernel_flags"] == ["avx2"]
    assert set(described["kernel_flags"]) <= set(KERNEL_FLAGS)


def test_record_machine_appends_one_entry_per_start_and_keeps_earlier_ones(tmp_path, caplog):
    info = _cpuinfo(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="ntp_ssl.machine"):
        first = record_machine(run_dir, argv=["ntp-ssl", "evaluate"], cpuinfo=info)
        second = record_machine(run_dir, argv=["ntp-ssl", "evaluate", "again"], cpuinfo=info)
    assert not caplog.records  # the same machine twice: nothing to warn about
    entries = read_machines(run_dir)
    assert [e["command"] for e in entries] == ["ntp-ssl evaluate", "ntp-ssl evaluate again"]
    assert entries == [first, second] and same_machine(first, second)
    assert "started" in first and first["cpu"] == "Test CPU 9000"


def test_a_run_resumed_on_another_machine_is_warned_about(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path))
    other = _cpuinfo(tmp_path, CPUINFO.replace("Test CPU 9000", "Other CPU 1").replace(" avx512f", ""))
    with caplog.at_level(logging.WARNING, logger="ntp_ssl.machine"):
        record_machine(run_dir, argv=["x"], cpuinfo=other)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "Test CPU 9000" in message and "Other CPU 1" in message and "pair results of one machine only" in message
    assert [e["cpu"] for e in read_machines(run_dir)] == ["Test CPU 9000", "Other CPU 1"]


def test_an_unreadable_machine_file_reads_as_empty(tmp_path):
    (tmp_path / "machine.json").write_text("{not json")
    assert read_machines(tmp_path) == []
    (tmp_path / "machine.json").write_text(json.dumps({"cpu": "x"}))  # not a list
    assert read_machines(tmp_path) == []
    record_machine(tmp_path, argv=["x"], cpuinfo=_cpuinfo(tmp_path))
    assert len(read_machines(tmp_path)) == 1


def test_machine_json_is_bookkeeping_not_work(tmp_path):
    """A run that stopped at start-up leaves run_config.json and machine.json; a corrected
    command may take its directory over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text("{}")
    record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path))
    assert not holds_work(run_dir)
    (run_dir / "results.csv").write_text("model\n")
    assert holds_work(run_dir)


CPUINFO_WITH_ID = """processor\t: 0
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
cache size\t: 307200 KB
flags\t\t: fpu avx2 avx512f amx_tile
processor\t: 1
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
cache size\t: 107520 KB
flags\t\t: fpu avx2
"""


def test_describe_machine_records_family_model_stepping_and_cache_of_the_first_processor(tmp_path):
    described = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path, CPUINFO_WITH_ID))
    assert described["cpu"] == "Intel(R) Xeon(R) Processor"
    assert described["cpu_id"] == "family 6 model 207 stepping 2"
    assert described["cpu_cache"] == "307200 KB"
    assert described["kernel_flags"] == ["avx2", "avx512f", "amx_tile"]
    without = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path))  # cpuinfo without those lines
    assert without["cpu_id"] is None and without["cpu_cache"] is None


def test_one_model_name_on_two_cpu_generations_is_two_machines(tmp_path, caplog):
    """A virtual machine names a Xeon "Intel(R) Xeon(R) Processor" whatever its generation;
    two such machines protected one seed into other weights (2026-12-06), so the family,
    model, stepping and cache tell them apart, and an entry written before they were recorded
    is compared on the rest alone."""
    first = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path, CPUINFO_WITH_ID))
    other_generation = CPUINFO_WITH_ID.replace("model\t\t: 207", "model\t\t: 143", 1).replace(
        "307200 KB", "107520 KB", 1)
    second = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path, other_generation))
    assert first["cpu"] == second["cpu"] and first["kernel_flags"] == second["kernel_flags"]
    assert not same_machine(first, second)
    older_entry = {key: value for key, value in first.items() if key not in ("cpu_id", "cpu_cache")}
    assert same_machine(older_entry, second) and same_machine(second, older_entry)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path, CPUINFO_WITH_ID))
    with caplog.at_level(logging.WARNING, logger="ntp_ssl.machine"):
        record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path, other_generation))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "model 207" in message and "model 143" in message and "107520 KB" in message


def test_the_numeric_libraries_versions_are_recorded_and_compared(tmp_path):
    """Protection's k-means (faiss), scikit-learn and numpy are version ranges in pyproject.toml:
    a fresh install can take newer ones, which change protected weights where the CPU record
    does not move."""
    import numpy

    from ntp_ssl.shared.machine import NUMERIC_LIBRARIES

    described = describe_machine("cpu", cpuinfo=_cpuinfo(tmp_path))
    assert set(described["libraries"]) == set(NUMERIC_LIBRARIES)
    assert described["libraries"]["numpy"] == numpy.__version__
    newer = {**described, "libraries": {**described["libraries"], "faiss-cpu": "99.0.0"}}
    assert same_machine(described, described) and not same_machine(described, newer)
    older_entry = {key: value for key, value in described.items() if key != "libraries"}
    assert same_machine(older_entry, newer)  # written before versions were recorded: not compared


def test_a_run_resumed_with_other_library_versions_names_them(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path))
    entries = read_machines(run_dir)
    entries[0]["libraries"] = {**first["libraries"], "faiss-cpu": "1.0.0"}
    (run_dir / "machine.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="ntp_ssl.machine"):
        record_machine(run_dir, argv=["x"], cpuinfo=_cpuinfo(tmp_path))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "pair results of one machine only" in messages[0]
    assert f"faiss-cpu 1.0.0 -> {first['libraries']['faiss-cpu']}" in messages[1]

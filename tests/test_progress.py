"""Progress bars: on a terminal only, so that a log file gets the stages' own lines."""

from __future__ import annotations

import subprocess
import sys


def test_progress_bars_show_on_a_terminal_only():
    from ntp_ssl.shared.progress import progress_bar

    assert progress_bar(range(3), enabled=False).disable
    assert progress_bar(range(3), enabled=True).disable  # pytest captures stderr: not a terminal


def test_a_log_file_gets_no_carriage_return_updates(tmp_path):
    """A bar in a process whose stderr is a file writes nothing there."""
    code = ("from ntp_ssl.shared.progress import progress_bar\n"
            "for _ in progress_bar(range(200), enabled=True, desc='x'): pass\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-c", code], stderr=handle, check=True)
    assert "\r" not in log.read_text() and "x:" not in log.read_text()

"""The test launcher's hang guard: a launch past its timeout fails with the stacks of its
processes, and no process of it (a rank in its own session included) survives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from tests.processes import run_bounded

HANGING_LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
open("child.pid", "w").write(str(child.pid))
def waiting_for_the_rank():
    time.sleep(600)
waiting_for_the_rank()
"""


def test_a_hung_launch_fails_with_its_stacks_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_bounded([sys.executable, "-c", HANGING_LAUNCHER], tmp_path, dict(os.environ), 5)
    message = str(failure.value)
    assert "still ran after 5 s" in message
    assert "waiting_for_the_rank" in message  # faulthandler's stack of the launcher
    child = int((tmp_path / "child.pid").read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"

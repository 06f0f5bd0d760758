"""A real multi-node SLURM cluster on this one machine, for the tests.

`LocalCluster(workdir, nodes=3).start()` installs Debian's slurm-wlm and munge when they are
missing, starts munged, one slurmctld and one slurmd daemon per node (n1, n2, n3, ... one CPU and
one stand-in "gpu" GRES each, so `--gpus-per-node=1` works without GPUs), maps the node names to
127.0.0.1 in /etc/hosts, and waits until every node is idle (a third node beyond the tests'
2-node jobs is where a job that excluded a bad node runs). `stop()` cancels every job and stops
the daemons it started. Everything but /etc/hosts and the packages lives in `workdir`; client
commands find the cluster through SLURM_CONF (`env()`).

Needs root (packages, daemons, /etc/hosts); `unavailable_reason()` says why it cannot run.

    python tests/slurm/cluster.py start WORKDIR [NODES]   # by hand: bring one up, leave it running
    python tests/slurm/cluster.py stop WORKDIR
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
MUNGE_DIRS = ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (packages, daemons, /etc/hosts)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


def install_packages() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


class LocalCluster:
    def __init__(self, workdir: Path, nodes: int = 2) -> None:
        self.workdir = workdir.resolve()
        self.nodes = tuple(f"n{i}" for i in range(1, nodes + 1))
        self.conf = self.workdir / "slurm.conf"
        self.started: list[Path] = []  # pid files of the daemons we started

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(
        self, *args: str, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=self.env(), capture_output=True, text=True, check=check, cwd=cwd
        )

    def start(self) -> LocalCluster:
        install_packages()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._map_hosts()
        self._write_config()
        for folder in ("state", *(f"slurmd.{n}" for n in self.nodes)):
            (self.workdir / folder).mkdir(exist_ok=True)
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], env=self.env(), check=True)
        self.started.append(self.workdir / "slurmctld.pid")
        for node in self.nodes:
            subprocess.run(["slurmd", "-N", node, "-f", str(self.conf)], env=self.env(), check=True)
            self.started.append(self.workdir / f"slurmd.{node}.pid")
        self.wait_idle()
        return self

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        deadline = time.monotonic() + 30  # let the jobs end before their daemons go
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        for pid_file in self.started:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        self.started.clear()

    def _start_munge(self) -> None:
        for folder in MUNGE_DIRS:
            os.makedirs(folder, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start (see /var/log/munge/munged.log)")

    def _map_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        missing = [
            n for n in self.nodes if not any(n in line.split()[1:] for line in text.splitlines())
        ]
        if missing:
            hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 {' '.join(missing)}\n")

    def _write_config(self) -> None:
        w = self.workdir
        host = socket.gethostname()
        count = len(self.nodes)
        first, last = 17001, 17000 + count
        nodes = (
            f"NodeName=n[1-{count}] NodeHostname={host} NodeAddr=127.0.0.1 "
            f"Port=[{first}-{last}] CPUs=1 RealMemory=10000 Gres=gpu:1"
        )
        self.conf.write_text(
            f"""ClusterName=coatnet-test
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=17001
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmUser=root
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SlurmdTimeout=30
MessageTimeout=20
GresTypes=gpu
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/slurmd.%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.%n.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.%n.log
{nodes}
PartitionName=debug Nodes=n[1-{count}] Default=YES MaxTime=INFINITE State=UP
"""
        )
        # A "GPU" per node backed by /dev/null: SLURM drops file-less GPUs, and a character device
        # is all it checks (task/none: no cgroup device limits). CUDA_VISIBLE_DEVICES=0 results.
        (w / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName=n[1-{count}] Name=gpu File=/dev/null\n"
        )

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (no job running or completing on it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        log = (self.workdir / "slurmctld.log").read_text()[-2000:]
        raise RuntimeError(f"SLURM nodes did not become idle: {out!r}\n{log}")


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    cluster = LocalCluster(folder, int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    if action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        for pid_file in folder.glob("*.pid"):
            cluster.started.append(pid_file)
        cluster.stop()

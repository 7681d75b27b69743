"""A real single-node Slurm for tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in a temp dir (munge key and socket, slurm.conf, state, spool, logs) on free
ports, so it never touches a system Slurm; :meth:`LocalSlurm.stop` stops the daemons it started,
by pid. Needs root (SlurmUser=root) and ``bash launch/slurm_local.sh`` (the packages).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    """Slurm could not be started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    if not path.exists():
        return f"({path.name}: missing)"
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return f"--- {path.name}:\n" + "\n".join(lines)


class LocalSlurm:
    """One controller + one compute node (this host, all its CPUs) in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60.0) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise SlurmUnavailable(
                f"not installed: {', '.join(missing)} (run `bash launch/slurm_local.sh`)"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "the local Slurm runs its daemons as root; run the tests as root"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged wants its socket dir searchable
        self._start_munge()
        self._write_conf()
        for name in ("slurmctld", "slurmd"):
            with open(self.root / f"{name}.out", "w") as log:  # the child keeps its own copy
                self.procs[name] = subprocess.Popen(
                    [name, "-D", "-f", str(self.conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = self.root / "munge.sock"
        cmd = [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
            f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
            f"--seed-file={self.root / 'munged.seed'}",
        ]  # fmt: skip
        with open(self.root / "munged.out", "w") as log:
            self.procs["munged"] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while not self.socket.exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise SlurmUnavailable("munged did not start\n" + _tail(self.root / "munged.out"))
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir(exist_ok=True)
        (r / "spool").mkdir(exist_ok=True)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(
            f"""\
ClusterName=mtltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=3600
SchedulerParameters=sched_interval=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={int(mem_mb * 0.8)} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({proc.returncode})\n" + self.logs())
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = out.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"node not idle after {timeout:.0f}s (state {state!r})\n" + self.logs()
        )

    def logs(self) -> str:
        names = ("munged.out", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log")
        return "\n".join(_tail(self.root / n) for n in names)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged (by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------ jobs
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kw)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o`` as dicts: one per job, or per element of an array."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return [
            dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            for line in out.splitlines()
            if line.strip()
        ]

    def wait(self, job_id: str, timeout: float = 300.0, count: int = 1) -> list[dict[str, str]]:
        """Poll until ``count`` jobs (array elements) of ``job_id`` have finished."""
        deadline = time.time() + timeout
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        jobs: list[dict[str, str]] = []
        while time.time() < deadline:
            jobs = self.jobs(job_id)
            if len(jobs) >= count and all(j.get("JobState") in final for j in jobs):
                return jobs
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {jobs}\n{self.logs()}")

"""A one-node SLURM cluster on this machine, for the tests of examples/slurm/*.sbatch.

Debian's packages (slurmctld, slurmd, slurm-client, munge) are installed with apt-get when the
commands are missing. Nothing outside one directory is configured or touched: a munge daemon of
our own (own key and socket), slurmctld and slurmd on free TCP ports, with their slurm.conf, state,
spool, pid and log files all under `Cluster.root` (the clients find the cluster through
SLURM_CONF). The node is `localhost` with 2 CPUs, in one partition `debug`.

Runs as root (slurmd starts the jobs' processes). A cluster left running by an earlier run (a
killed pytest) is found through the pid files in `root`, its jobs cancelled and its daemons
stopped before a fresh one starts.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
NODE = "localhost"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order


class SlurmError(RuntimeError):
    pass


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *SBIN])


def which(command: str) -> Optional[str]:
    return shutil.which(command, path=_search_path())


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if which(c) is None]


def install_slurm(timeout: float = 900) -> None:
    """apt-get install the packages when a command is missing; SlurmError if that fails."""
    missing = missing_commands()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmError(f"SLURM is not installed ({', '.join(missing)} missing) and this is not root: install "
                         f"{' '.join(PACKAGES)} (apt-get), or set LOOPLM_SKIP_SLURM=1 to skip the SLURM tests")
    if shutil.which("apt-get") is None:
        raise SlurmError(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get here: "
                         f"install {' '.join(PACKAGES)}, or set LOOPLM_SKIP_SLURM=1 to skip the SLURM tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    output = ""
    # A stale package index gives 404s: update it and try once more.
    for commands in ([install], [["apt-get", "update", "-q"], install]):
        try:
            for command in commands:
                result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, timeout=timeout)
                output = result.stdout
                if result.returncode != 0:
                    break
            else:
                if not missing_commands():
                    return
                output += f"\n(after the install, still missing: {', '.join(missing_commands())})"
        except (OSError, subprocess.TimeoutExpired) as e:
            output = str(e)
    raise SlurmError(f"installing SLURM failed ({' '.join(install)}); set LOOPLM_SKIP_SLURM=1 to skip the SLURM "
                     f"tests. apt-get said:\n{output[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Cluster:
    def __init__(self, root: Optional[Path] = None, cpus: int = 2):
        self.root = Path(root or Path(tempfile.gettempdir()) / f"looplm-slurm-{os.getuid()}")
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"

    # --- commands -----------------------------------------------------------------------------
    def env(self, **extra: str) -> dict:
        """This process's environment for the clients and the jobs: SLURM_CONF pointing here, and
        no SLURM_* / SBATCH_* / SRUN_* or launcher variables (pytest may itself run in a job)."""
        launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in launcher}
        env["PATH"] = _search_path()
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=kwargs.pop("env", None) or self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)}: exit status {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def submit(self, script: Path, *options: str, env: dict, cwd: Path) -> int:
        """sbatch OPTIONS SCRIPT in `cwd` with `env`; the job id."""
        result = self.run("sbatch", "--parsable", *options, str(script), env=env, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
        result = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_for_job(self, job_id: int, timeout: float, done=None) -> dict:
        """Poll until the job has ended (or `done(job)` is true); its last `scontrol show job`.
        SlurmError, after cancelling the job, when it takes longer than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        while True:
            job = self.job(job_id)
            if (done(job) if done else job.get("JobState") in ended):
                return job
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise SlurmError(f"job {job_id} still not done after {timeout:.0f} s: {job}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """A fresh cluster, its node idle; an earlier one in `root` is stopped first."""
        if os.geteuid() != 0:
            raise SlurmError("the local SLURM cluster needs root (slurmd runs the jobs' processes as their user); "
                             "set LOOPLM_SKIP_SLURM=1 to skip the SLURM tests")
        missing = missing_commands()
        if missing:
            raise SlurmError(f"SLURM commands missing: {', '.join(missing)}")
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        # munged wants its socket's directory searchable by all, and its key private.
        self.root.mkdir(parents=True, mode=0o755)
        os.chmod(self.root, 0o755)
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        key = self.root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(self._config())
        try:
            self._start("munged", "--key-file", str(key), "--socket", str(self.root / "munge.sock"),
                        "--pid-file", str(self.root / "munged.pid"), "--log-file", str(self.root / "munged.log"),
                        "--seed-file", str(self.root / "munged.seed"), "--force")
            self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged to create its socket")
            self._start("slurmctld", "-f", str(self.conf))
            self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout,
                       "slurmctld to answer")
            self._start("slurmd", "-f", str(self.conf), "-N", NODE)
            self._wait(self._node_idle, timeout, f"node {NODE} to become idle")
        except SlurmError:
            self.stop()
            raise

    def _config(self) -> str:
        return "\n".join([
            "ClusterName=looplm-test",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start (default 120 s).
            f"AuthInfo=socket={self.root / 'munge.sock'},cred_expire=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            # No cgroups in a container: processes tracked through /proc, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Schedule every 2 s (a requeued job starts soon after it may).
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "JobRequeue=1",
            "ReturnToService=2",
            # The node is what this file says, whatever the machine has.
            "SlurmdParameters=config_overrides",
            "MinJobAge=600",
            "KillWait=30",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1024 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _start(self, daemon: str, *args: str) -> None:
        result = subprocess.run([which(daemon), *args], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"{daemon} did not start (exit status {result.returncode}):\n{result.stdout}\n{self.logs()}")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).stdout.strip().lower()
        if state.startswith(("down", "drain")):
            self.run("scontrol", "update", f"NodeName={NODE}", "State=RESUME", check=False)
        return state == "idle"

    def _pid(self, daemon: str) -> Optional[int]:
        """The daemon's pid from its pid file, if it is running (and is that daemon)."""
        try:
            pid = int((self.root / f"{daemon}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and _process_name(pid) == daemon else None

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then stop the daemons (those of an earlier run in `root` too)."""
        if self._pid("slurmctld") is not None and self.conf.exists():
            try:
                self._cancel_jobs(timeout)
            except (OSError, subprocess.SubprocessError):
                pass  # no clients (uninstalled?), or a hung controller: the daemons go anyway
        for daemon in DAEMONS:
            pid = self._pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and _process_name(pid) == daemon and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid) and _process_name(pid) == daemon:
                os.kill(pid, signal.SIGKILL)

    def _cancel_jobs(self, timeout: float) -> None:
        jobs = self.run("squeue", "--noheader", "--format=%A", check=False, timeout=20).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout=20)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._pid("slurmd") is not None:
            if not self.run("squeue", "--noheader", check=False, timeout=20).stdout.strip():
                return
            time.sleep(0.5)

"""A throw-away two-node SLURM cluster on this machine, for the tests of slurm/*.sbatch (recipe:
Debian's slurm-wlm 22.05, ``AuthType=auth/none``, no munge, cgroups or accounting).

One ``slurmctld`` and two ``slurmd`` (nodes ``n1`` and ``n2``, each in a private mount namespace whose
/etc/hosts maps n1 and n2 to 127.0.0.1, so a job resolves its node names) run from a private directory on free
ports; ``stop`` cancels every job, waits for them to end, then stops only the daemons this object started, by
PID, slurmd before slurmctld. Each node offers all of this machine's CPUs and memory.

Every wait has a time-out and raises :class:`SlurmError` with the daemon logs' tails.

Example:
    cluster = LocalSlurm(tmp_dir).start()
    job = cluster.sbatch(["--nodes=2", "slurm/train.sbatch", "configs/quickstart.yaml"], cwd=repo, env=env)
    info = cluster.wait_job(job, timeout_s=300)          # {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}
    cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["LocalSlurm", "SlurmError", "missing_requirements", "install_slurm", "DAEMONS", "FINAL_STATES", "GPU_TYPE",
           "NODES"]

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
"""Programs the cluster needs (Debian packages slurmctld, slurmd, slurm-client)."""
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
"""Job states after which a job (if not requeued) does nothing more."""
NODES = ("n1", "n2")
GPU_TYPE = "fake"
"""The typed GRES each node offers once: ``gpu:fake:1``."""


class SlurmError(RuntimeError):
    """The local cluster did not start, or a job did not reach the awaited state in time."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def missing_requirements() -> str | None:
    """Why the cluster cannot be set up here (None when it can): it needs root (the daemons and the mount
    namespaces), unshare, and either the SLURM programs or apt-get to install them."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd, slurmctld and mount namespaces); run as root"
    if not shutil.which("unshare"):
        return "the local SLURM cluster needs unshare (util-linux) for the nodes' private /etc/hosts"
    if all(shutil.which(p) for p in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return (f"SLURM is not installed ({', '.join(p for p in DAEMONS if not shutil.which(p))} missing) and "
                "apt-get is not available to install it; install slurmctld, slurmd and slurm-client")
    return None


def install_slurm(timeout_s: float = 600.0) -> None:
    """``apt-get install --no-install-recommends slurmctld slurmd slurm-client`` when a program is missing (an
    ``apt-get update`` first if the package lists do not know them). Raises SlurmError with apt's output."""
    if all(shutil.which(p) for p in DAEMONS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        upd = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout_s)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise SlurmError(f"installing SLURM failed: {' '.join(cmd)} exited {out.returncode}:\n"
                             f"{upd.stdout[-2000:]}{upd.stderr[-2000:]}{out.stdout[-3000:]}{out.stderr[-3000:]}")
    missing = [p for p in DAEMONS if not shutil.which(p)]
    if missing:
        raise SlurmError(f"after installing {', '.join(PACKAGES)}, still missing: {', '.join(missing)}")


def _hardware() -> str:
    """This machine as a node line (``CPUs=2 Boards=1 ... RealMemory=...``), from ``slurmd -C``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60, check=True).stdout
    line = out.splitlines()[0]
    return re.sub(r"^NodeName=\S+\s*", "", line).strip()


class LocalSlurm:
    """The two-node cluster (module docstring). ``env`` is the environment every SLURM command needs
    (``SLURM_CONF``); ``run`` runs one with it."""

    def __init__(self, root: str | Path, *, partition: str = "debug", min_job_age_s: int = 300):
        self.root = Path(root)
        self.partition = partition
        self.min_job_age_s = min_job_age_s
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self._ctld: subprocess.Popen | None = None
        self._slurmd: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in list(self.env):               # a job or allocation around the tests must not leak in
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    # ------------------------------------------------------------------------------------------- daemons

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(3)
        for d in ("state", "log", "spool/n1", "spool/n2"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        hw = _hardware()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} {hw} "
                          f"Gres=gpu:{GPU_TYPE}:1 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        # One fake GPU per node (a symlink to /dev/null): jobs ask for --gpus-per-node=fake:1 like on a GPU
        # cluster with typed GRES, and SLURM sets SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE for them.
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        if not (dev / "nvidia0").is_symlink():
            (dev / "nvidia0").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu Type={GPU_TYPE} File={dev}/nvidia0\n")
        # MinJobAge: a finished job stays visible to `scontrol show job` long enough for the tests to read it.
        # KillWait: seconds between SIGTERM and SIGKILL when a step is stopped.
        self.conf.write_text(f"""\
ClusterName=entcovci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
KillWait=5
GresTypes=gpu
# A requeued job may start again cred_expire + 1 s after the requeue (default 120 s).
AuthInfo=cred_expire=5
MinJobAge={self.min_job_age_s}
JobRequeue=1
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        hosts = Path("/etc/hosts").read_text()
        (self.root / "hosts").write_text(hosts.rstrip("\n") + "\n127.0.0.1 " + " ".join(NODES) + "\n")

    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        """Write the config, start slurmctld and the two slurmd, wait until both nodes are idle."""
        self._write_config()
        try:
            self._ctld = subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=open(self.log_dir / "slurmctld.out", "wb"),
                                          stderr=subprocess.STDOUT, start_new_session=True)
            for node in NODES:
                # A private mount namespace per node: its /etc/hosts (a bind mount) resolves n1 and n2.
                self._slurmd[node] = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     'mount --bind "$1" /etc/hosts && exec slurmd -D -N "$2"', "sh", str(self.root / "hosts"), node],
                    env=self.env, stdin=subprocess.DEVNULL, stdout=open(self.log_dir / f"slurmd-{node}.out", "wb"),
                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout_s
            while True:
                for name, proc in [("slurmctld", self._ctld), *self._slurmd.items()]:
                    if proc.poll() is not None:
                        raise SlurmError(f"{name} exited ({proc.returncode}) while starting\n{self.logs()}")
                out = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False)
                if out.returncode == 0 and set(out.stdout.split()) >= set(NODES):
                    return self
                if time.monotonic() > deadline:
                    raise SlurmError(f"nodes {NODES} not idle within {timeout_s:.0f} s (sinfo: {out.stdout!r} "
                                     f"{out.stderr!r})\n{self.logs()}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 60.0) -> None:
        """Cancel every job and wait for them to leave; then stop the slurmd daemons and slurmctld this object
        started (SIGTERM, SIGKILL after a grace period). Idempotent."""
        if self._ctld is not None and self._ctld.poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *sorted(set(jobs))], check=False)
                deadline = time.monotonic() + timeout_s
                while (self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.strip()
                       and time.monotonic() < deadline):
                    time.sleep(0.5)
        for proc in [*self._slurmd.values(), self._ctld]:
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        self._slurmd.clear()
        self._ctld = None

    # ------------------------------------------------------------------------------------------- commands

    def run(self, cmd: list[str], *, check: bool = True, timeout_s: float = 60.0, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, cmd))} exited {out.returncode}: {out.stdout}{out.stderr}")
        return out

    def sbatch(self, args: list[str], *, cwd: str | Path, env: dict | None = None) -> int:
        """Submit; returns the job id. ``env``: extra variables on top of the cluster's environment."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env={**self.env, **(env or {})})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} when the job is no longer known)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if out.returncode != 0:
            return {}
        info: dict[str, str] = {}
        for token in re.findall(r"(\S+?)=(\S*)", out.stdout.splitlines()[0] if out.stdout else ""):
            info.setdefault(token[0], token[1])
        return info

    def wait_job(self, job_id: int, *, timeout_s: float, states=FINAL_STATES, poll_s: float = 0.5) -> dict:
        """Poll until the job's state is one of ``states`` (not pending a requeue); returns its info. SlurmError
        after ``timeout_s`` (the job is cancelled then), with the job's info and the daemon logs."""
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll_s)
        self.run(["scancel", str(job_id)], check=False)
        raise SlurmError(f"job {job_id} not in {sorted(states)} within {timeout_s:.0f} s: {info}\n{self.logs()}")

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """What a preemption notice does: ``scancel --signal=SIG --batch`` (the batch shell only)."""
        self.run(["scancel", f"--signal={sig}", "--batch", str(job_id)])

    def logs(self, lines: int = 40) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        out = []
        for f in sorted(self.log_dir.glob("*")):
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {f} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

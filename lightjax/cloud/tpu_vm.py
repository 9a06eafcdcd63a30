"""Cloud TPU VMs from a laptop, over the `gcloud` CLI: create a slice, run a command on all its workers,
follow it, delete the slice.

A slice bigger than one host is several VMs ("workers"), each driving its own chips; a JAX job runs
the same command on every worker at once and `jax.distributed` joins them from the TPU environment.
`run` does what a user would otherwise do by hand on each worker: put this checkout there (or clone a
git ref), install lightjax with its TPU extra, and start the command everywhere together. Worker 0's
output is streamed; the other workers' output goes to local log files and only their error lines are
shown, since on a pod every worker prints the same progress. The job's status is worker 0's, or the
first other failure's.

Every gcloud call goes through `Gcloud`, which only prints the commands under `dry_run`, so a user can
read exactly what would happen to a billed resource before it happens.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lightjax.runtime.hardware import tpu_topology

REMOTE_DIR = "lightjax"  # the checkout's place in each worker's home
LOG, PID, STATUS = "lightjax-run.log", "lightjax-run.pid", "lightjax-run.status"  # a detached job's files
CHIPS_PER_HOST = 4  # in slices of more than one host, every generation here
ERROR_LINE = re.compile(r"Traceback|Error|error:|Exception|Killed|FATAL|Check failed")


class TpuVmError(ValueError):
    """A request that cannot work, with what to do instead."""


# gcloud's accelerator-type family -> (generation in lightjax.runtime.hardware, default runtime version,
# the most chips one host of it holds).
_FAMILIES = {
    "v4": ("v4", "tpu-ubuntu2204-base", 4),
    "v5p": ("v5p", "v2-alpha-tpuv5", 4),
    "v5litepod": ("v5e", "v2-alpha-tpuv5-lite", 8),
    "v6e": ("v6e", "v2-alpha-tpuv6e", 8),
}
_EXAMPLE_COUNTS = {"v4": (8, 16, 32), "v5p": (8, 16, 32), "v5litepod": (1, 4, 8, 16, 64, 256), "v6e": (1, 8, 16, 256)}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # Cloud TPU's accelerator type, e.g. v5litepod-16
    chips: int
    hosts: int
    version: str  # the TPU VM runtime its generation boots by default


def accelerator(name: str) -> Accelerator:
    """v5litepod-16 -> 16 chips on 4 hosts (v4/v5p counts are TensorCores, 2 per chip)."""
    m = re.fullmatch(r"(v\w+?)-(\d+)", name.strip())
    if not m or m.group(1) not in _FAMILIES:
        raise TpuVmError(f"--accelerator={name!r} is not a Cloud TPU accelerator type; known ones:\n"
                         f"{known_accelerators()}")
    family, count = m.group(1), int(m.group(2))
    generation, version, single_host = _FAMILIES[family]
    try:
        chips = tpu_topology(f"{generation}-{count}").chips
    except ValueError:
        raise TpuVmError(f"--accelerator={name!r}: {family} comes in other sizes; known ones:\n"
                         f"{known_accelerators()}") from None
    return Accelerator(name, chips, 1 if chips <= single_host else chips // CHIPS_PER_HOST, version)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def known_accelerators() -> str:
    rows = []
    for family, counts in _EXAMPLE_COUNTS.items():
        sizes = [accelerator(f"{family}-{n}") for n in counts]
        rows.append(f"  {family}-N: " + ", ".join(f"{a.name} ({_count(a.chips, 'chip')}, {_count(a.hosts, 'host')})"
                                                   for a in sizes) + ", ...")
    return "\n".join(rows)


class Gcloud:
    """Runs gcloud commands, or under dry_run prints each one (shell-quoted) instead."""

    def __init__(self, project: str | None = None, dry_run: bool = False, out: IO[str] = sys.stdout):
        self.project, self.dry_run, self.out = project, dry_run, out

    def command(self, *args: str) -> list[str]:
        return ["gcloud", *args, *([f"--project={self.project}"] if self.project else [])]

    def check_ready(self) -> None:
        """gcloud is installed and logged in (not asked under dry_run, which calls nothing)."""
        if self.dry_run:
            return
        if shutil.which("gcloud") is None:
            raise TpuVmError("gcloud is not on PATH: install the Google Cloud CLI "
                             "(https://cloud.google.com/sdk/docs/install), then run gcloud auth login.")
        accounts = subprocess.run(["gcloud", "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"],
                                  capture_output=True, text=True)
        if accounts.returncode or not accounts.stdout.strip():
            raise TpuVmError("gcloud has no active account: run gcloud auth login "
                             "(and gcloud config set project PROJECT).")

    def call(self, args: Sequence[str]) -> int:
        if self.dry_run:
            print(shlex.join(args), file=self.out, flush=True)
            return 0
        return subprocess.run(args).returncode

    def query(self, args: Sequence[str], what: str) -> str:
        if self.dry_run:
            raise TpuVmError(f"--dry_run cannot ask gcloud for {what}; give it on the command line.")
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode:
            raise TpuVmError(f"{shlex.join(args)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        return done.stdout.strip()

    def start(self, args: Sequence[str]) -> subprocess.Popen[str] | None:
        if self.dry_run:
            print(shlex.join(args), file=self.out, flush=True)
            return None
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def _tpu(gcloud: Gcloud, verb: str, *args: str) -> list[str]:
    return gcloud.command("compute", "tpus", "tpu-vm", verb, *args)


def create(gcloud: Gcloud, name: str, zone: str, acc: Accelerator, version: str | None, spot: bool) -> int:
    return gcloud.call(_tpu(gcloud, "create", name, f"--zone={zone}", f"--accelerator-type={acc.name}",
                            f"--version={version or acc.version}", *(["--spot"] if spot else [])))


def delete(gcloud: Gcloud, name: str, zone: str) -> int:
    return gcloud.call(_tpu(gcloud, "delete", name, f"--zone={zone}", "--quiet"))


def list_vms(gcloud: Gcloud, zone: str) -> int:
    return gcloud.call(_tpu(gcloud, "list", f"--zone={zone}"))


def describe(gcloud: Gcloud, name: str, zone: str) -> Accelerator:
    kind = gcloud.query(_tpu(gcloud, "describe", name, f"--zone={zone}", "--format=value(acceleratorType)"),
                        f"the accelerator type of {name} (--accelerator)")
    return accelerator(kind)


def ssh(gcloud: Gcloud, name: str, zone: str, worker: int | str, command: str) -> list[str]:
    return _tpu(gcloud, "ssh", name, f"--zone={zone}", f"--worker={worker}", f"--command={command}")


@dataclasses.dataclass(frozen=True)
class Source:
    """What runs on the workers: this checkout as it is (`root`), or `git_ref` cloned from `repo`."""

    root: Path
    git_ref: str | None = None
    repo: str | None = None

    def archive_path(self, name: str) -> Path:
        return Path(tempfile.gettempdir()) / f"lightjax-{name}.tar.gz"

    def pack(self, path: Path) -> None:
        """The checkout's files as git sees them (tracked, plus untracked ones it does not ignore)."""
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=self.root, capture_output=True, text=True, check=True).stdout.split("\0")
        with tarfile.open(path, "w:gz") as tar:
            for f in filter(None, files):
                if (self.root / f).is_file():
                    tar.add(self.root / f, arcname=f)

    def install(self) -> str:
        """The shell command that puts the code in ~/lightjax and installs it, on a worker."""
        if self.git_ref:
            fetch = (f"rm -rf ~/{REMOTE_DIR} && git clone -q {shlex.quote(self.repo or '')} ~/{REMOTE_DIR} && "
                     f"cd ~/{REMOTE_DIR} && git checkout -q {shlex.quote(self.git_ref)}")
        else:
            fetch = (f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
                     f"tar xzf ~/{REMOTE_DIR}.tar.gz -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR}")
        return f"{fetch} && python3 -m pip install -q -e '.[tpu]'"


def remote_command(command: Sequence[str], workdir: str | None) -> str:
    """The job's shell line on a worker: a .py script runs under python3, unbuffered so it streams."""
    argv = list(command)
    if argv and argv[0].endswith(".py"):
        argv = ["python3", *argv]
    if workdir:
        argv.append(f"--workdir={workdir}")
    return f"cd ~/{REMOTE_DIR} && PYTHONUNBUFFERED=1 {shlex.join(argv)}"


def _job_workdir(command: Sequence[str], workdir: str | None) -> str | None:
    if workdir:
        return workdir
    for i, arg in enumerate(command):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def check_job(acc: Accelerator, command: Sequence[str], workdir: str | None) -> None:
    if not command:
        raise TpuVmError("No command given: put it after --, e.g. -- scripts/train.py --config configs/baseline.py")
    if acc.hosts == 1:
        return
    where = _job_workdir(command, workdir)
    if not (where or "").startswith("gs://"):
        raise TpuVmError(f"{acc.name} has {acc.hosts} hosts, which must share the workdir: give "
                         f"--workdir=gs://BUCKET/RUN (got {where!r}; a local path would be {acc.hosts} folders).")
    script = next((arg for arg in command if arg.endswith(".py")), "")  # also after python3 -u ...
    if script.endswith("train.py") and not _joins_job(command):
        raise TpuVmError(f"{acc.name} has {acc.hosts} hosts: add --distributed to the train command so that they "
                         "join one job.")


def _joins_job(command: Sequence[str]) -> bool:
    """Whether a train command asks to join a multi-process job (--distributed, as absl spells it true)."""
    for arg in command:
        name, _, value = arg.partition("=")
        if name == "--distributed" and value.lower() in ("", "true", "1", "t", "yes"):
            return True
        if name == "--coordinator_address" and value:
            return True
    return False


def prepare(gcloud: Gcloud, name: str, zone: str, source: Source) -> int:
    """Put the code on every worker and install it; the first failing step's status, else 0."""
    if source.git_ref is None:
        archive = source.archive_path(name)
        if not gcloud.dry_run:
            source.pack(archive)
        status = gcloud.call(_tpu(gcloud, "scp", str(archive), f"{name}:{REMOTE_DIR}.tar.gz", f"--zone={zone}",
                                  "--worker=all"))
        if status:
            return status
    return gcloud.call(ssh(gcloud, name, zone, "all", source.install()))


def detach(gcloud: Gcloud, name: str, zone: str, command: str) -> int:
    """Start the job on every worker in the background, its output, pid and exit status in files."""
    job = (f"rm -f ~/{STATUS}; nohup sh -c {shlex.quote(f'{command}; echo $? > ~/{STATUS}')} "
           f"> ~/{LOG} 2>&1 < /dev/null & echo $! > ~/{PID}")
    return gcloud.call(ssh(gcloud, name, zone, "all", job))


def follow(gcloud: Gcloud, name: str, zone: str, worker: int) -> int:
    """Stream a detached job's log from one worker until the job ends; its exit status."""
    tail = (f"tail -n +1 --pid=$(cat ~/{PID}) -f ~/{LOG}; "
            f"test -f ~/{STATUS} && exit $(cat ~/{STATUS}); echo 'the job ended without an exit status' >&2; exit 1")
    return gcloud.call(ssh(gcloud, name, zone, worker, tail))


def _relay(worker: int, stream: IO[str], log: IO[str], lock: threading.Lock) -> None:
    """Worker 0's lines to stdout; every other worker's to its log file, and its error lines to stderr."""
    for line in stream:
        log.write(line)
        log.flush()
        if worker == 0 or ERROR_LINE.search(line):
            with lock:
                out = sys.stdout if worker == 0 else sys.stderr
                out.write(line if worker == 0 else f"[worker {worker}] {line}")
                out.flush()


def _tail(path: Path, lines: int = 10) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def attached(gcloud: Gcloud, name: str, zone: str, hosts: int, command: str, log_dir: Path,
             grace_s: float = 120.0) -> int:
    """Run the job on all workers at once (one ssh each) and wait for it. After a worker fails, the
    others get `grace_s` to end on their own (JAX stops a job whose peer died) before their ssh is
    stopped. Returns worker 0's exit status, or the first other failure's."""
    procs = [gcloud.start(ssh(gcloud, name, zone, w, command)) for w in range(hosts)]
    if gcloud.dry_run:
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [open(log_dir / f"worker-{w}.log", "w") for w in range(hosts)]  # noqa: SIM115 (closed below)
    lock = threading.Lock()
    relays = [threading.Thread(target=_relay, args=(w, p.stdout, logs[w], lock), daemon=True)
              for w, p in enumerate(procs)]
    for r in relays:
        r.start()
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.poll() for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    for r in relays:
        r.join()
    for f in logs:
        f.close()
    codes = [p.wait() for p in procs]
    return _report(codes, log_dir)


def _report(codes: list[int], log_dir: Path) -> int:
    failures = [(w, c) for w, c in enumerate(codes) if c]
    for w, c in failures:
        if w:
            sys.stderr.write(f"worker {w} exited with status {c}; its last lines ({log_dir / f'worker-{w}.log'}):\n"
                             f"{_tail(log_dir / f'worker-{w}.log')}")
    if failures:
        sys.stderr.write(f"tpu_vm: the job failed on worker(s) {', '.join(str(w) for w, _ in failures)}; "
                         f"every worker's output is in {log_dir}\n")
    return codes[0] or (failures[0][1] if failures else 0)


def log_dir(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "lightjax-tpu-vm" / name

"""Cloud TPU VMs in one command each, over the gcloud CLI (MaxText's multihost_runner, for lightjax).

    python scripts/tpu_vm.py create --name my-tpu --zone us-west4-a --accelerator v5litepod-16 --spot
    python scripts/tpu_vm.py run --name my-tpu --zone us-west4-a --workdir gs://BUCKET/run -- \
        scripts/train.py --config configs/pythia_160m.py --distributed
    python scripts/tpu_vm.py delete --name my-tpu --zone us-west4-a

`run` copies this checkout to every worker (or clones --git_ref), installs `.[tpu]`, starts the command on
all workers at once and streams worker 0's output with the others' errors; its exit status is the job's.
`--detach` leaves the job running and `logs` follows it. `--dry_run` prints the gcloud commands instead.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from lightjax.cloud import tpu_vm

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpu_vm", description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_: str, needs_name: bool = True) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help_)
        if needs_name:
            v.add_argument("--name", required=True, help="The TPU VM's name.")
        v.add_argument("--zone", required=True, help="Its zone, e.g. us-west4-a (v5e), us-central2-b (v4).")
        v.add_argument("--project", help="The Google Cloud project, if not gcloud's configured one.")
        v.add_argument("--dry_run", action="store_true", help="Print the gcloud commands instead of running them.")
        return v

    c = verb("create", "Create a TPU VM (a slice: one VM per host).")
    c.add_argument("--accelerator", required=True, help="Accelerator type, e.g. v5litepod-8, v5litepod-16, v4-32.")
    c.add_argument("--version", help="Runtime version (default: the generation's usual one).")
    c.add_argument("--spot", action="store_true", help="A Spot VM: cheaper, and may be preempted at any time.")
    verb("delete", "Delete a TPU VM (its billing stops).")
    verb("list", "List the TPU VMs of a zone.", needs_name=False)
    r = verb("run", "Run a command on every worker, e.g. -- scripts/train.py --config ... --distributed.")
    r.add_argument("--accelerator", help="The slice's accelerator type (default: asked from gcloud).")
    r.add_argument("--workdir", help="Appended to the command as --workdir; gs://... for a multi-host slice.")
    r.add_argument("--git_ref", help="Clone this git ref on the workers instead of copying the checkout.")
    r.add_argument("--repo", help="The repository --git_ref comes from (default: this checkout's origin).")
    r.add_argument("--detach", action="store_true", help="Leave the job running; follow it with `logs`.")
    r.add_argument("--grace_s", type=float, default=120.0,
                   help="After a worker fails, how long the others get to stop on their own.")
    g = verb("logs", "Follow a detached job's output until it ends; exits with its status.")
    g.add_argument("--worker", type=int, default=0, help="Whose output (default 0).")
    return p


def _source(args: argparse.Namespace) -> tpu_vm.Source:
    repo = args.repo
    if args.git_ref and not repo:
        origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True, text=True)
        if origin.returncode:
            raise tpu_vm.TpuVmError("--git_ref needs --repo: this checkout has no origin remote to clone from.")
        repo = origin.stdout.strip()
    return tpu_vm.Source(ROOT, args.git_ref, repo)


def run(gcloud: tpu_vm.Gcloud, args: argparse.Namespace, command: list[str]) -> int:
    acc = tpu_vm.accelerator(args.accelerator) if args.accelerator else tpu_vm.describe(gcloud, args.name, args.zone)
    tpu_vm.check_job(acc, command, args.workdir)
    status = tpu_vm.prepare(gcloud, args.name, args.zone, _source(args))
    if status:
        sys.stderr.write(f"tpu_vm: putting the code on {args.name}'s workers failed (status {status}).\n")
        return status
    job = tpu_vm.remote_command(command, args.workdir)
    if args.detach:
        status = tpu_vm.detach(gcloud, args.name, args.zone, job)
        if not status and not gcloud.dry_run:
            print(f"Started on {acc.hosts} worker(s). Follow it: python scripts/tpu_vm.py logs --name {args.name} "
                  f"--zone {args.zone}")
        return status
    return tpu_vm.attached(gcloud, args.name, args.zone, acc.hosts, job, tpu_vm.log_dir(args.name), args.grace_s)


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if command and args.verb != "run":
        parser().error(f"only run takes a command after --, not {args.verb}")
    gcloud = tpu_vm.Gcloud(args.project, args.dry_run)
    try:
        if args.verb == "create":
            acc = tpu_vm.accelerator(args.accelerator)
            gcloud.check_ready()
            return tpu_vm.create(gcloud, args.name, args.zone, acc, args.version, args.spot)
        gcloud.check_ready()
        if args.verb == "delete":
            return tpu_vm.delete(gcloud, args.name, args.zone)
        if args.verb == "list":
            return tpu_vm.list_vms(gcloud, args.zone)
        if args.verb == "logs":
            return tpu_vm.follow(gcloud, args.name, args.zone, args.worker)
        return run(gcloud, args, command)
    except tpu_vm.TpuVmError as e:
        sys.stderr.write(f"tpu_vm: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""TPU VMs and slices with gcloud: create, install, run on every worker, copy logs, delete.

  python -m tpu.pod create    --name llada --zone us-east5-a --accelerator_type v5p-64 [--queued] [--spot]
  python -m tpu.pod status    --name llada --zone us-east5-a [--queued]
  python -m tpu.pod install   --name llada --zone us-east5-a
  python -m tpu.pod mount     --name llada --zone us-east5-a --bucket BUCKET   # /mnt/BUCKET
  python -m tpu.pod run       --name llada --zone us-east5-a -- \\
      python -m llada_jax.train --config configs/llada_8b_sft.py --workdir /mnt/BUCKET/sft
  python -m tpu.pod copy_logs --name llada --zone us-east5-a --num_workers 8 --local_dir logs/
  python -m tpu.pod delete    --name llada --zone us-east5-a [--queued]

Every subcommand takes --project and --dry_run (print the gcloud commands,
one per line, run nothing). `install` packs this checkout (`git archive HEAD`),
copies it to every worker, and installs it with the `tpu` extra into a Python
3.11 virtual environment (~/llada_venv; TPU VM images ship an older Python).
`run` starts the same command on every worker (`--worker=all`) inside that
environment and checkout, appending its output to ~/llada_logs/run.log on each
worker; with --background it is detached (nohup) so a dropped ssh session does
not stop it. Multi-host JAX needs nothing more: `jax.distributed.initialize()`
discovers the slice on TPU VMs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

REMOTE_DIR = "~/llada_jax"
VENV = "~/llada_venv"
LOG_DIR = "~/llada_logs"
ARCHIVE = "llada_jax.tar.gz"
# Default TPU VM runtime image per TPU generation (the accelerator type's prefix).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def _gcloud(*args: str, project: str | None, zone: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *args, f"--zone={zone}"]
  return cmd + ([f"--project={project}"] if project else [])


def _ssh(a, command: str, worker: str = "all") -> list[str]:
  return _gcloud("tpu-vm", "ssh", a.name, f"--worker={worker}", f"--command={command}",
                 project=a.project, zone=a.zone)


def runtime_version(accelerator_type: str) -> str:
  """The default runtime image for e.g. 'v5p-64' (ValueError for an unknown generation)."""
  generation = accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise ValueError(f"--accelerator_type: no default --version for {accelerator_type!r} "
                     f"(known: {', '.join(RUNTIME_VERSIONS)}); pass --version")
  return RUNTIME_VERSIONS[generation]


def create_commands(a) -> list[list[str]]:
  version = a.version or runtime_version(a.accelerator_type)
  spot = ["--spot"] if a.spot else []
  if a.queued:
    return [_gcloud("queued-resources", "create", a.queued_id or a.name, f"--node-id={a.name}",
                    f"--accelerator-type={a.accelerator_type}", f"--runtime-version={version}",
                    *spot, project=a.project, zone=a.zone)]
  return [_gcloud("tpu-vm", "create", a.name, f"--accelerator-type={a.accelerator_type}",
                  f"--version={version}", *spot, project=a.project, zone=a.zone)]


def status_commands(a) -> list[list[str]]:
  if a.queued:
    return [_gcloud("queued-resources", "describe", a.queued_id or a.name,
                    "--format=value(state.state)", project=a.project, zone=a.zone)]
  return [_gcloud("tpu-vm", "describe", a.name, "--format=value(state)",
                  project=a.project, zone=a.zone)]


def install_commands(a) -> list[list[str]]:
  archive = f"/tmp/{ARCHIVE}"
  setup = " && ".join([
      "sudo apt-get update -qq",
      f"sudo apt-get install -y -qq {a.python} {a.python}-venv",
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} {LOG_DIR}",
      f"tar xzf ~/{ARCHIVE} -C {REMOTE_DIR}",
      f"{a.python} -m venv {VENV}",
      f"{VENV}/bin/pip install -q --upgrade pip",
      f"{VENV}/bin/pip install -q -e \"$HOME/{REMOTE_DIR[2:]}[{a.extras}]\"",
  ])
  return [
      ["git", "-C", a.source, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
      _gcloud("tpu-vm", "scp", archive, f"{a.name}:~/{ARCHIVE}", "--worker=all",
              project=a.project, zone=a.zone),
      _ssh(a, setup),
  ]


def mount_commands(a) -> list[list[str]]:
  """gcsfuse-mounts a bucket at the same path on every worker: a shared workdir for
  multi-host Orbax checkpoints (every host writes its shards to the same directory)."""
  if a.bucket.startswith("gs://") or "/" in a.bucket:
    raise ValueError(f"--bucket: expected a bucket name, got {a.bucket!r}")
  mount_point = a.mount_point or f"/mnt/{a.bucket}"
  install = " && ".join([
      "GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s)",
      "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
      "https://packages.cloud.google.com/apt $GCSFUSE_REPO main\" "
      "| sudo tee /etc/apt/sources.list.d/gcsfuse.list",
      "curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg "
      "| sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null",
      "sudo apt-get update -qq", "sudo apt-get install -y -qq gcsfuse"])
  mount = (f"sudo mkdir -p {mount_point} && sudo chown $USER {mount_point} && "
           f"(mountpoint -q {mount_point} || gcsfuse --implicit-dirs {a.bucket} {mount_point})")
  return [_ssh(a, f"(command -v gcsfuse > /dev/null || ({install})) && {mount}")]


def run_commands(a) -> list[list[str]]:
  if not a.command:
    raise ValueError("run: give the command after --, e.g. -- python -m llada_jax.train ...")
  env = [f"{k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in a.env)]
  command = " ".join([*env, shlex.join(a.command)])  # KEY=VALUE words: the command's environment
  prepare = f"cd {REMOTE_DIR} && source {VENV}/bin/activate"
  log = f"{LOG_DIR}/{a.log_name}"
  if a.background:
    remote = f"mkdir -p {LOG_DIR} && {prepare} && nohup {command} >> {log} 2>&1 &"
  else:
    remote = (f"mkdir -p {LOG_DIR} && {{ {prepare} && {command}; }} 2>&1 | tee -a {log}; "
              "exit ${PIPESTATUS[0]}")
  return [_ssh(a, remote, a.worker)]


def copy_logs_commands(a) -> list[list[str]]:
  workers = range(a.num_workers) if a.worker is None else [a.worker]
  return [["mkdir", "-p", f"{a.local_dir}/worker{w}"] for w in workers] + [
      _gcloud("tpu-vm", "scp", "--recurse", f"{a.name}:{LOG_DIR}", f"{a.local_dir}/worker{w}",
              f"--worker={w}", project=a.project, zone=a.zone) for w in workers]


def delete_commands(a) -> list[list[str]]:
  if a.queued:  # --force also deletes the slice it holds
    return [_gcloud("queued-resources", "delete", a.queued_id or a.name, "--force", "--quiet",
                    project=a.project, zone=a.zone)]
  return [_gcloud("tpu-vm", "delete", a.name, "--quiet", project=a.project, zone=a.zone)]


COMMANDS = {"create": create_commands, "status": status_commands, "install": install_commands,
            "mount": mount_commands, "run": run_commands, "copy_logs": copy_logs_commands, "delete": delete_commands}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m tpu.pod", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="subcommand", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM / slice (node) name")
  common.add_argument("--zone", required=True, help="e.g. us-east5-a")
  common.add_argument("--project", help="GCP project (default: gcloud's)")
  common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  queued = argparse.ArgumentParser(add_help=False)
  queued.add_argument("--queued", action="store_true", help="a queued resource, not a plain TPU VM")
  queued.add_argument("--queued_id", help="queued-resource id (default: --name)")

  p = sub.add_parser("create", parents=[common, queued], help="create a TPU VM or slice")
  p.add_argument("--accelerator_type", required=True, help="e.g. v4-8, v5p-64, v5litepod-16")
  p.add_argument("--version", help="runtime image (default: by TPU generation)")
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  sub.add_parser("status", parents=[common, queued], help="state of the VM or queued resource")
  p = sub.add_parser("install", parents=[common], help="install this checkout on every worker")
  p.add_argument("--source", default=".", help="git checkout to ship (its HEAD)")
  p.add_argument("--extras", default="tpu", help="pip extras to install")
  p.add_argument("--python", default="python3.11", help="interpreter for the venv")
  p = sub.add_parser("mount", parents=[common], help="mount a GCS bucket on every worker")
  p.add_argument("--bucket", required=True, help="bucket name (no gs://)")
  p.add_argument("--mount_point", help="default: /mnt/BUCKET")
  p = sub.add_parser("run", parents=[common], help="run a command on every worker")
  p.add_argument("--background", action="store_true", help="detach (nohup); see the log")
  p.add_argument("--worker", default="all", help="'all' or one worker's index")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the command (repeatable)")
  p.add_argument("--log_name", default="run.log", help=f"log file under {LOG_DIR}")
  p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
  p = sub.add_parser("copy_logs", parents=[common], help=f"copy {LOG_DIR} of workers here")
  p.add_argument("--local_dir", default="tpu_logs", help="local directory (worker<i>/ inside)")
  p.add_argument("--num_workers", type=int, default=1, help="hosts in the slice")
  p.add_argument("--worker", type=int, help="only this worker")
  sub.add_parser("delete", parents=[common, queued], help="delete the VM / queued resource")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if getattr(args, "command", None) and args.command[0] == "--":
    args.command = args.command[1:]
  for env in getattr(args, "env", []):
    if "=" not in env or not env.split("=", 1)[0].isidentifier():
      parser.error(f"--env: expected KEY=VALUE, got {env!r}")
  if args.subcommand == "run" and not (args.worker == "all" or args.worker.isdigit()):
    parser.error(f"--worker: expected 'all' or a worker index, got {args.worker!r}")
  if getattr(args, "num_workers", 1) < 1:
    parser.error(f"--num_workers: expected a positive integer, got {args.num_workers}")
  try:
    commands = COMMANDS[args.subcommand](args)
  except ValueError as e:
    parser.error(str(e))
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      result = subprocess.run(cmd, check=False)
      if result.returncode:
        print(f"failed with exit status {result.returncode}: {shlex.join(cmd)}", file=sys.stderr)
        return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())

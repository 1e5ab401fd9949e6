"""tpu/pod.py: the gcloud commands it prints with --dry_run, and the remote shell it builds."""

import os
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def pod(*args, check=True):
  run = subprocess.run([sys.executable, "-m", "tpu.pod", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
  if check:
    assert run.returncode == 0, run.stderr
  return run


def dry(subcommand, *args):
  return [shlex.split(line) for line in pod(subcommand, "--dry_run", *args).stdout.splitlines()]


def test_create_status_delete():
  assert dry("create", "--name", "llada", "--zone", "us-east5-a", "--accelerator_type", "v5p-64",
             "--project", "proj") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "llada", "--accelerator-type=v5p-64",
       "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=proj"]]
  assert dry("create", "--name", "llada", "--zone", "z", "--accelerator_type", "v4-32",
             "--queued", "--queued_id", "qr1", "--spot") == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "qr1", "--node-id=llada",
       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot",
       "--zone=z"]]
  assert dry("status", "--name", "llada", "--zone", "z", "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "llada",
       "--format=value(state.state)", "--zone=z"]]
  assert dry("delete", "--name", "llada", "--zone", "z", "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "llada", "--force", "--quiet",
       "--zone=z"]]
  assert dry("delete", "--name", "llada", "--zone", "z") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llada", "--quiet", "--zone=z"]]


def test_install_ships_the_checkout_to_every_worker():
  assert dry("install", "--name", "llada", "--zone", "z") == [
      ["git", "-C", ".", "archive", "--format=tar.gz", "--output=/tmp/llada_jax.tar.gz", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/llada_jax.tar.gz",
       "llada:~/llada_jax.tar.gz", "--worker=all", "--zone=z"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llada", "--worker=all",
       "--command=sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 "
       "python3.11-venv && rm -rf ~/llada_jax && mkdir -p ~/llada_jax ~/llada_logs && "
       "tar xzf ~/llada_jax.tar.gz -C ~/llada_jax && python3.11 -m venv ~/llada_venv && "
       "~/llada_venv/bin/pip install -q --upgrade pip && "
       "~/llada_venv/bin/pip install -q -e \"$HOME/llada_jax[tpu]\"", "--zone=z"]]


def test_run_same_command_on_all_workers_and_copy_logs():
  train = ["python", "-m", "llada_jax.train", "--config", "configs/llada_8b_sft.py",
           "--workdir", "gs://bucket/sft", "--config.init_from=gs://bucket/LLaDA 8B"]
  [cmd] = dry("run", "--name", "llada", "--zone", "z", "--env", "A=1 2", "--", *train)
  assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llada", "--worker=all"]
  assert cmd[7] == ("--command=mkdir -p ~/llada_logs && { cd ~/llada_jax && source "
                    "~/llada_venv/bin/activate && A='1 2' python -m llada_jax.train --config "
                    "configs/llada_8b_sft.py --workdir gs://bucket/sft "
                    "'--config.init_from=gs://bucket/LLaDA 8B'; } 2>&1 | tee -a "
                    "~/llada_logs/run.log; exit ${PIPESTATUS[0]}")
  assert cmd[8:] == ["--zone=z"]
  [cmd] = dry("run", "--name", "llada", "--zone", "z", "--worker", "0", "--", "ls")
  assert cmd[6] == "--worker=0"
  assert dry("copy_logs", "--name", "llada", "--zone", "z", "--num_workers", "2",
             "--local_dir", "logs") == [
      ["mkdir", "-p", "logs/worker0"], ["mkdir", "-p", "logs/worker1"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "llada:~/llada_logs",
       "logs/worker0", "--worker=0", "--zone=z"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "llada:~/llada_logs",
       "logs/worker1", "--worker=1", "--zone=z"]]


def _remote(tmp_path, *args):
  """The --command a worker would run, executed by bash in a fake home directory."""
  [cmd] = dry("run", "--name", "n", "--zone", "z", *args)
  home = tmp_path / "home"
  (home / "llada_jax").mkdir(parents=True, exist_ok=True)
  (home / "llada_venv" / "bin").mkdir(parents=True, exist_ok=True)
  (home / "llada_venv" / "bin" / "activate").write_text("export IN_VENV=yes\n")
  remote = cmd[7].removeprefix("--command=")
  run = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": str(home)})
  return run, home


def test_remote_command_semantics(tmp_path):
  script = "import os,sys; print(os.getcwd().endswith('llada_jax'), os.environ['IN_VENV'], " \
           "os.environ['A']); sys.exit(3)"
  run, home = _remote(tmp_path, "--env", "A=x y", "--", sys.executable, "-c", script)
  assert run.returncode == 3  # the command's exit status, not tee's
  assert run.stdout == "True yes x y\n"
  assert (home / "llada_logs" / "run.log").read_text() == "True yes x y\n"
  run, home = _remote(tmp_path, "--background", "--", sys.executable, "-c", "print('bg')")
  assert run.returncode == 0
  for _ in range(100):  # detached: the log fills in shortly
    if (home / "llada_logs" / "run.log").read_text().endswith("bg\n"):
      break
    subprocess.run(["sleep", "0.1"], check=True)
  assert (home / "llada_logs" / "run.log").read_text().endswith("bg\n")


def test_bad_input_is_named():
  bad = pod("create", "--name", "x", "--zone", "z", "--accelerator_type", "v9-8", "--dry_run",
            check=False)
  assert bad.returncode == 2 and "no default --version for 'v9-8'" in bad.stderr
  bad = pod("run", "--name", "x", "--zone", "z", "--dry_run", check=False)
  assert bad.returncode == 2 and "give the command after --" in bad.stderr
  bad = pod("run", "--dry_run", "--name", "x", "--zone", "z", "--env", "1A", "--", "ls",
            check=False)
  assert bad.returncode == 2 and "--env: expected KEY=VALUE" in bad.stderr
  bad = pod("run", "--dry_run", "--name", "x", "--zone", "z", "--worker", "w1", "--", "ls",
            check=False)
  assert bad.returncode == 2 and "--worker: expected 'all' or a worker index" in bad.stderr


def test_mount_bucket_on_every_worker():
  [cmd] = dry("mount", "--name", "llada", "--zone", "z", "--bucket", "my-bucket")
  assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llada", "--worker=all"]
  assert cmd[7].startswith("--command=(command -v gcsfuse > /dev/null || (")
  assert cmd[7].endswith("sudo mkdir -p /mnt/my-bucket && sudo chown $USER /mnt/my-bucket && "
                         "(mountpoint -q /mnt/my-bucket || "
                         "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket)")
  bad = pod("mount", "--dry_run", "--name", "x", "--zone", "z", "--bucket", "gs://b", check=False)
  assert bad.returncode == 2 and "--bucket: expected a bucket name" in bad.stderr

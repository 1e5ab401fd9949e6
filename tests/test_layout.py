"""The package layout: import direction between layers, and the entry-point aliases."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "llada_jax"

# part of the package -> parts it must not import from
FORBIDDEN = {
    "core": ("sampling", "training", "checkpoints", "frontends", "convert"),
    "layers": ("models", "sampling", "training", "checkpoints", "frontends", "convert"),
    "models": ("sampling", "training", "checkpoints", "frontends", "convert"),
    "sampling": ("training", "checkpoints", "frontends", "convert"),
    "checkpoints": ("sampling", "training", "frontends", "convert"),
    "convert": ("sampling", "training", "frontends"),
    "training": ("frontends", "convert"),
}
CORE = ("config.py", "sharding.py", "tokenizer.py", "paths.py")


def _part(path: pathlib.Path) -> str | None:
  rel = path.relative_to(PKG).parts
  if len(rel) == 1:
    return "core" if rel[0] in CORE else None  # other top-level files are entry-point aliases
  return rel[0]


def _imported(path: pathlib.Path) -> set[str]:
  """Top-level subpackages of llada_jax that `path` imports (at any depth of the file)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llada_jax"):
      parts = node.module.split(".")
      if len(parts) > 1:
        out.add(parts[1])
      else:
        out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[1] for a in node.names
                 if a.name.startswith("llada_jax.") and "." in a.name)
  return out


def test_import_direction():
  bad = []
  for path in sorted(PKG.rglob("*.py")):
    part = _part(path)
    for target in sorted(_imported(path) & set(FORBIDDEN.get(part, ()))):
      bad.append(f"{path.relative_to(ROOT)} ({part}) imports llada_jax.{target}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("alias, target", [
    ("llada_jax.sample", "llada_jax.frontends.cli"),
    ("llada_jax.chat", "llada_jax.frontends.chat"),
    ("llada_jax.app", "llada_jax.frontends.app"),
    ("llada_jax.evaluate", "llada_jax.frontends.evaluate"),
    ("llada_jax.train", "llada_jax.training.train"),
    ("llada_jax.aot", "llada_jax.training.aot"),
    ("convert.hf_to_orbax", "llada_jax.convert.hf_to_orbax"),
    ("convert.orbax_to_hf", "llada_jax.convert.orbax_to_hf"),
])
def test_entry_point_aliases_run_the_implementation(alias, target):
  import importlib  # pylint: disable=g-import-not-at-top
  assert importlib.import_module(alias).main is importlib.import_module(target).main


def test_python_m_convert_alias_from_a_clone():
  out = subprocess.run([sys.executable, "-m", "convert.hf_to_orbax", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert "--hf_dir" in out.stdout

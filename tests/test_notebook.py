"""notebooks/sampling.ipynb runs headless (nbclient + ipykernel) on CPU with the tiny fixture."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "sampling.ipynb"


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


@pytest.mark.slow
def test_sampling_notebook_runs(fixture_dir, monkeypatch, tmp_path):
  """Installs this checkout (its dependencies are here already) into a scratch
  directory, the kernel's only path to llada_jax, then runs every cell."""
  site = tmp_path / "site"
  site.mkdir()
  for key, value in {"CHECKPOINT": fixture_dir, "DTYPE": "float32", "BATCH_SIZE": "3",
                     "GEN_LENGTH": "16", "STEPS": "16", "BLOCK_LENGTH": "8", "MC_NUM": "4",
                     "SOURCE": str(NOTEBOOK.parents[1]),
                     "PIP_ARGS": f"--no-deps --target {site}"}.items():
    monkeypatch.setenv(f"LLADA_{key}", value)
  monkeypatch.delenv("LLADA_SKIP_INSTALL", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", str(site))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert f"from {site / 'llada_jax'}" in outputs  # the installed copy ran
  assert "loaded " in outputs and " parameters in " in outputs
  assert "first call (compile + run)" in outputs and "generated tokens/s" in outputs
  assert outputs.count("> ") >= 3  # one completion per prompt of the batch
  assert all(f"nats '{a}'" in outputs for a in (" Paris", " London", " Berlin"))
  assert not any(o["output_type"] == "error" for c in nb.cells for o in c.get("outputs", []))

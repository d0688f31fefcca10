"""notebooks/quickstart.ipynb runs offline top to bottom (needs the `notebook` extra: nbclient, ipykernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if not (ROOT / "models" / "micro-llava" / "config.json").is_file():
        pytest.skip("models/micro-llava is not in this checkout")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    assert "== fastervlm" in text and "== random" in text and "equivalent tokens" in text
    images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the sample strip and the kept-token overlay


@pytest.mark.slow
def test_quickstart_notebook_runs_with_jupyter_execute(tmp_path):
    """As a user runs it: `jupyter execute` (the notebook extra installs jupyter); the notebook file is not
    rewritten."""
    import os
    import shutil
    import subprocess
    import sys

    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or shutil.which("jupyter")
    if jupyter is None:
        pytest.skip("jupyter is not installed (pip install 'vtprune[notebook]')")
    if not (ROOT / "models" / "micro-llava" / "config.json").is_file():
        pytest.skip("models/micro-llava is not in this checkout")
    before = NOTEBOOK.read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([jupyter, "execute", str(NOTEBOOK)], cwd=NOTEBOOK.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTEBOOK.read_bytes() == before

"""The Colab notebooks: executed top to bottom (small configuration), committed without outputs.

Each notebook runs in a fresh ``python3`` kernel of this interpreter with
``COLLAGE_NOTEBOOK_SMALL=1``; any cell error fails the test with the cell's
traceback (nbclient's ``CellExecutionError``).
"""

from __future__ import annotations

import pathlib

import nbclient  # the notebooks extra, installed by the test extra: fail, don't skip
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_mcf_numerics.ipynb"]


def _stream_text(nb) -> str:
  return "".join(
      out.get("text", "")
      for cell in nb.cells if cell.cell_type == "code"
      for out in cell.outputs if out.output_type == "stream")


def test_the_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, (
      f"{path.name}: code cells {dirty} carry outputs or execution counts; strip them "
      "(e.g. `jupyter nbconvert --clear-output --inplace`) before committing.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_top_to_bottom(path, monkeypatch):
  monkeypatch.setenv("COLLAGE_NOTEBOOK_SMALL", "1")  # the kernel inherits the environment
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  text = _stream_text(nb)
  assert "Configuration: small" in text, "the notebook did not pick up COLLAGE_NOTEBOOK_SMALL=1"
  assert "Backend: CPU" in text or "Backend: GPU" in text or "Backend: TPU" in text

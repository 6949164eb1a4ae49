"""Every notebook in notebooks/ runs top to bottom without an error, on the .venv interpreter,
against the small real trace shipped in notebooks/data/ (about 10-20 s per notebook on 2 cores)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
KERNEL = "moeload-test-python"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernels of a spec written here whose argv is this interpreter (never whatever `python3`
    resolves to on PATH)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kdir = tmp_path_factory.mktemp("kernels")
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moeload tests",
        "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    }
    (kdir / KERNEL).mkdir()
    (kdir / KERNEL / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
    return lambda: KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def test_there_are_notebooks_and_data():
    names = [p.name for p in NOTEBOOKS]
    assert names[:1] == ["01_quickstart.ipynb"], names
    assert (NB_DIR / "data" / "demo.moeload" / "manifest.json").is_file()
    size = sum(p.stat().st_size for p in (NB_DIR / "data").rglob("*") if p.is_file())
    assert size < 2_000_000, f"notebooks/data holds {size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "make_data.py" in nb.cells[0].source  # the intro says how to regenerate the data


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_manager_factory):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, km=kernel_manager_factory(), timeout=120, allow_errors=False,
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2, f"{path.name}: expected figures in the outputs, found {images}"

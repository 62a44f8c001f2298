"""Every notebook in notebooks/ executes top to bottom with nbclient on the tiny offline checkpoint.

The cell tagged `parameters` is replaced (MODEL = the tiny checkpoint, small pool and MAX_TOKENS); the kernel is
this interpreter (a kernelspec written to a temp JUPYTER_PATH), so it sees the same environment.
"""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "multihead-test"


def tiny_parameters(model: str, max_tokens: int = 16) -> str:
    return (f"MODEL = {model!r}\nMAX_TOKENS = {max_tokens}\nPOOL = '8MiB'\nPAGE_BYTES = '8KiB'\n"
            "DEVICE = 'cpu'\nDTYPE = 'float32'\nKV_PAGES = 32\n")


def inject_parameters(nb, source: str):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    cells[0].source = source
    return nb


def write_kernelspec(folder: Path, name: str = KERNEL) -> Path:
    """A kernelspec running this interpreter on this checkout's package; put `folder` first on JUPYTER_PATH."""
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (multihead tests)", "language": "python",
        "env": {"PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get(
            "PYTHONPATH") else []))},  # the checkout under test, whatever is installed
    }))
    return folder


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    folder = write_kernelspec(tmp_path_factory.mktemp("jupyter"))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder)] + ([old] if old else []))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_notebooks_are_valid_and_parametrized():
    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-code-review-team.ipynb",
                                           "03-how-paged-kv-works.ipynb", "04-benchmark-analysis.ipynb",
                                           "05-agents-over-http.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and 'MODEL = "embedded:SmolLM2-135M-Instruct"' in params[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tiny_ckpt, kernel_env):
    from nbclient import NotebookClient

    nb = inject_parameters(nbformat.read(path, as_version=4), tiny_parameters(str(tiny_ckpt("llama"))))
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=60, resources={"metadata": {"path": str(path.parent)}})
    t0 = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"{path.name} took {elapsed:.0f} s"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in text
    if path.name.startswith("03"):
        assert "prompt tokens from the cache" in text
        tables = "\n".join(o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
                           for o in c.get("outputs", []))
        assert "preemptions" in tables

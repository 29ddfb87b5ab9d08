"""The notebooks run top to bottom on the fixture results (so they cannot rot) and show their figures."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_one_notebook_per_question():
    assert [p.stem for p in NOTEBOOKS] == ["01_key_rank", "02_dk_surface", "03_methods_compared", "04_speed"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_figures(path, results_ro, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    root = results_ro.parent.parent
    # as a user runs them: the kernel in notebooks/, the paths relative to the repository root (marked by its
    # Snakefile), as the README writes them
    (root / "Snakefile").touch()
    (root / "notebooks").mkdir(exist_ok=True)
    monkeypatch.setenv("LOKI_RESULTS", str(results_ro.relative_to(root)))
    monkeypatch.setenv("LOKI_KERNELS", "kernels/measured")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    want = {"01_key_rank": 1, "02_dk_surface": 2, "03_methods_compared": 2, "04_speed": 4}[path.stem]
    assert len(images) >= want, f"{path.name}: {len(images)} figures shown, expected {want}"
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "Traceback" not in text
    if path.stem != "01_key_rank":  # the report's table (exactly the DAG's results), not a glob that the job in
        # flight (a folder without metrics.json) would stop
        assert "from " in text and "summary.parquet" in text
    if path.stem == "04_speed":  # the measured rows per KV head (the fixture's perplexity points carry them)
        assert "union / kept" in text and "byte_ratio_measured" in text

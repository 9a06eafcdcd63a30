"""colab/quickstart.ipynb runs end to end (headless, CPU, a short run on the local data copy)."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT, SHAKESPEARE

NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the notebook sees one CPU device
    env.update(LIGHTJAX_LOCAL_CHECKOUT=str(ROOT), LIGHTJAX_NOTEBOOK_STEPS="40", LIGHTJAX_DATA_PATH=str(SHAKESPEARE),
               PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=env)
    except Exception as e:  # the failing cell's traceback is in the message
        pytest.fail(f"the notebook failed: {e}")
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "backend: cpu, 1 device(s)" in outputs
    assert "'step': 40" in outputs
    assert "ROMEO:" in outputs and "JULIET:" in outputs
    assert "step 40: validation loss" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss plot

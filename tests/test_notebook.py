"""The colab/ notebooks run end to end (headless, CPU): the quickstart's short run on the local data
copy, and the sharding notebook's placements and sweeps."""

import json
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT, SHAKESPEARE, script_env

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

NOTEBOOKS = ROOT / "colab"


@pytest.mark.parametrize("name", ["quickstart", "sharding"])
def test_committed_notebook_has_no_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def _run(name, tmp_path, **env_vars):
    """The notebook executed in a fresh kernel; its code cells' outputs as (text, images)."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = script_env()  # the notebook sets up its own devices
    env.update(LIGHTJAX_LOCAL_CHECKOUT=str(ROOT), PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), **env_vars)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=env)
    except Exception as e:  # the failing cell's traceback is in the message
        pytest.fail(f"the notebook failed: {e}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") +
                     o.get("data", {}).get("text/markdown", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return re.sub(r"\x1b\[[0-9;]*m", "", text), images


def test_quickstart_notebook_runs(tmp_path):
    text, images = _run("quickstart", tmp_path, LIGHTJAX_NOTEBOOK_STEPS="40", LIGHTJAX_DATA_PATH=str(SHAKESPEARE))
    assert "backend: cpu, 1 device(s)" in text
    assert "'step': 40" in text
    assert "ROMEO:" in text and "JULIET:" in text
    assert "step 40: validation loss" in text
    assert len(images) == 1  # the loss plot


def test_sharding_notebook_runs(tmp_path):
    from tests.test_hardware import _require_libtpu

    _require_libtpu()  # its last section compiles for a v5e slice
    text, images = _run("sharding", tmp_path, JAX_PLATFORMS="cpu")
    assert "backend: cpu, 8 devices" in text
    # Under fsdp=4, tensor=2: the MLP output weight in 2 x 4 shards, the batch in 4 row blocks of 2 devices.
    placements = text.split("=== fsdp + tensor: data=1, fsdp=4, tensor=2")[1]
    assert re.search(r"CPU 0\s+CPU 2\s+CPU 4\s+CPU 6\s+CPU 1\s+CPU 3\s+CPU 5\s+CPU 7", placements)
    assert re.search(r"CPU 0,1\s+CPU 2,3\s+CPU 4,5\s+CPU 6,7", placements)
    assert "=== data: data=8" in text and "CPU 0,1,2,3,4,5,6,7" in text  # data parallelism: whole copies
    for layout in ("8x1x1", "1x8x1", "1x4x2"):
        assert re.search(layout + r" default remat=none batch=16 attention=\w+: .* measured [\d.]+ ms", text)
    assert text.count("| 8x1x1 default") == 1 and text.count("| 1x4x2 default") == 1  # the table
    assert len(images) == 2  # memory and step time
    for layout in ("4x1x1", "1x4x1", "1x2x2"):  # compiled for the TPU slice
        assert re.search(layout + r" default remat=none batch=16 attention=\w+: [\d.]+ (MiB|GiB)/device peak fits",
                         text)
    for chip in ("v5e:2x2", "v6e:2x2"):  # the comparison: the cheapest layout that fits, priced
        assert re.search(chip + r" \(4 chips\): .*, [\d.]+ MiB/chip, .* ms/step, MFU .* per 1M tokens, .* days", text)
    # Two v5e:2x2 slices: the gradient all-reduce crosses the data-center network.
    assert re.search(r"2x4x1 default remat=none batch=16 attention=\w+: .* GB over the data-center network", text)

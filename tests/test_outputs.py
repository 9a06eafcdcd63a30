"""Nothing a user types deletes their work: output folders never replace what lightjax did not write
there, and a fresh run never starts over an existing one. Each case snapshots the folders involved and
requires them byte for byte afterwards."""

from pathlib import Path

import pytest

from lightjax.train.trainer import train
from tests.helpers import SHAKESPEARE, run_script
from tests.runs import CLI_TINY, run_config

pytestmark = pytest.mark.shakespeare


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/a and runs/b: two finished tiny runs side by side."""
    root = tmp_path_factory.mktemp("outputs") / "runs"
    for name in ("a", "b"):
        train(run_config(root.parent, max_steps=3, save_every=0), root / name)
    return root


def _refused(out, *words):
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("where", ["the run", "inside the run", "above the runs"])
def test_export_into_or_around_a_run_is_refused(runs, where):
    before = snapshot(runs)
    out = {"the run": runs / "a", "inside the run": runs / "a" / "export", "above the runs": runs}[where]
    result = run_script("export.py", f"--workdir={runs / 'a'}", f"--out={out}")
    _refused(result, str(out))
    assert snapshot(runs) == before
    result = run_script("export.py", f"--workdir={runs / 'a'}", f"--out={out}", "--overwrite")
    _refused(result, "training run")  # --overwrite never deletes a run
    assert snapshot(runs) == before


def test_a_folder_of_other_files_is_kept_and_an_earlier_export_replaced(runs, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "notes.txt").write_text("mine")
    _refused(run_script("convert_hf.py", "export", f"--workdir={runs / 'a'}", f"--out={hf}"), "notes.txt",
             "--overwrite")
    assert snapshot(hf) == {"notes.txt": b"mine"}
    exported = tmp_path / "export"
    for dtype in ("float32", "bfloat16"):  # an earlier export of the same kind is replaced
        result = run_script("export.py", f"--workdir={runs / 'a'}", f"--out={exported}", f"--dtype={dtype}")
        assert result.returncode == 0, result.stderr
    assert (exported / "lightjax_output.json").is_file() and "bfloat16" in (exported / "model_config.json").read_text()
    (exported / "mine.txt").write_text("added later")
    _refused(run_script("export.py", f"--workdir={runs / 'a'}", f"--out={exported}"), "mine.txt")
    assert (exported / "mine.txt").read_text() == "added later"
    _refused(run_script("convert_hf.py", "export", f"--workdir={runs / 'a'}", f"--out={exported}", "--step=3"),
             "lightjax export", "Hugging Face")  # another kind of output
    result = run_script("convert_hf.py", "export", f"--workdir={runs / 'a'}", f"--out={hf}", "--overwrite")
    assert result.returncode == 0 and not (hf / "notes.txt").exists()  # asked for


def test_resume_never_on_an_existing_run_is_refused_before_anything_is_written(runs):
    before = snapshot(runs)
    result = run_script("train.py", "--config", "configs/baseline.py", f"--workdir={runs / 'a'}", *CLI_TINY,
                        "--config.checkpoint.resume=never", f"--config.data.data_dir={runs.parent / 'tfds'}")
    _refused(result, "resume='never'", "last checkpoint is step 3", "another --workdir", "resume=auto")
    assert snapshot(runs) == before


def test_fault_injection_keeps_a_foreign_out_and_names_the_training_error(tmp_path):
    foreign = tmp_path / "B"
    foreign.mkdir()
    (foreign / "results.csv").write_text("mine")
    result = run_script("fault_injection.py", f"--out={foreign}", "--kills=1", "--", "--config", "configs/smoke.py")
    _refused(result, str(foreign), "results.csv")
    assert snapshot(foreign) == {"results.csv": b"mine"}
    result = run_script("fault_injection.py", f"--out={tmp_path / 'new'}", "--kills=1", "--", "--config",
                        "configs/smok.py", f"--config.data.local_path={SHAKESPEARE}")
    _refused(result, "the training command failed", "configs/smok.py: no such file")

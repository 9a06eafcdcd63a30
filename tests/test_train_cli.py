"""The front door, end to end: scripts/train.py in subprocesses, and every config in configs/."""

import csv
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lightjax.train.config import ConfigError
from lightjax.train.trainer import train
from lightjax.train.validate import validate
from tests.helpers import ROOT, SHAKESPEARE, load_config_module, local_data_flags, run_script

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

ROW_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "mfu_full_square", "tokens_seen", "elapsed_s"}
EVAL_KEYS = {"step", "val_loss", "val_ppl", "val_bpc", "val_tokens", "tokens_seen", "elapsed_s"}


def _run(workdir, *args, config="configs/smoke.py", devices=1):
    """scripts/train.py on the local Tiny Shakespeare copy."""
    return run_script("train.py", "--config", config, f"--workdir={workdir}", *local_data_flags(workdir), *args,
                      devices=devices)


def _rows(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=[1, 8], ids=["1-device", "8-devices"])
def smoke_run(request, tmp_path_factory):
    """configs/smoke.py through scripts/train.py for 40 steps, on 1 device or FSDP over 8."""
    devices = request.param
    workdir = tmp_path_factory.mktemp(f"smoke-{devices}") / "run"
    extra = ["--config.mesh.fsdp=8", "--config.mesh.data=1"] if devices == 8 else []
    out = _run(workdir, "--config.train.max_steps=40", "--config.train.eval_every=20",
               "--config.checkpoint.save_every=20", *extra, devices=devices)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return devices, workdir, out


def test_smoke_run_writes_its_files(smoke_run):
    devices, workdir, out = smoke_run
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "loss.png", "tokenizer/tokenizer.json"):
        assert (workdir / name).is_file(), name
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "40"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["mesh"]["fsdp"] == (8 if devices == 8 else 1)
    assert "Done: 40 steps, 40,960 tokens" in out.stdout


def test_smoke_run_logs_and_learns(smoke_run):
    _, workdir, _ = smoke_run
    rows = _rows(workdir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert all(set(r) == ROW_KEYS for r in train_rows) and all(set(r) == EVAL_KEYS for r in eval_rows)
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40] and [r["step"] for r in eval_rows] == [20, 40]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3
    assert eval_rows[-1]["val_loss"] < eval_rows[0]["val_loss"]


def test_smoke_run_csv_matches_its_jsonl(smoke_run):
    _, workdir, _ = smoke_run
    rows = _rows(workdir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    csv_rows = list(csv.DictReader((workdir / "metrics.csv").open()))
    assert [r["step"] for r in csv_rows] == ["10", "20", "30", "40"]
    assert [bool(r["val_loss"]) for r in csv_rows] == [False, True, False, True]
    assert float(csv_rows[-1]["val_loss"]) == pytest.approx(eval_rows[-1]["val_loss"], rel=1e-5)
    assert float(csv_rows[0]["train_loss"]) == pytest.approx(train_rows[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ("--config.train.max_stepz=10", "unknown config key 'max_stepz' Did you mean \"max_steps\""),
    ("--config.train.max_steps=ten", "flag --config.train.max_steps=ten: invalid literal for int()"),
    ("--config.optim.lr=-0.001", "config.optim.lr=-0.001 must be positive"),
    ("--config.optim.warmup_steps=500", "config.optim.warmup_steps=500 must be in [0, train.max_steps=100)"),
    ("--config.data.local_path=/no/such/input.txt", "config.data.local_path='/no/such/input.txt' does not exist"),
    ("--config.data.data_dir=gs://bucket/tfds", "config.data.data_dir='gs://bucket/tfds' must be a local folder"),
    ("--num_processes=2", "Give all of --coordinator_address, --num_processes and --process_id, or none (cluster "
                          "auto-detection); missing --coordinator_address, --process_id."),
    ("--process_id=2 --num_processes=2 --coordinator_address=127.0.0.1:1",
     "--process_id=2 must be in [0, --num_processes=2)."),
    ("--config.optim.no_decay=7", "config.optim.no_decay=(7,) names no parameter of this model: 7; its parameter "
                                  "names are bias, embedding, kernel, lora_a, lora_b, scale."),
    ("--config.checkpoint.resume=", "config.checkpoint.resume='' must be 'auto', 'never', or a run directory"),
    ("--config.data.source=text:/ --config.data.tokenizer=byte --config.model.vocab_size=257",
     "config.data.source='text:/' matches folders (/); name files"),
])
def test_bad_config_is_one_line_without_traceback(tmp_path, override, message):
    out = _run(tmp_path / "run", *override.split())
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert message in last, out.stderr[-1500:]


@pytest.mark.parametrize("text,message", [
    ("def get_config():\n    raise RuntimeError('boom')\n", "bad.py, line 2: RuntimeError: boom"),
    ("def get_config():\n    return int('x')\n", "bad.py, line 2: ValueError: invalid literal for int() with "
                                                   "base 10: 'x'"),
    ("x = (\n", "bad.py, line 1: SyntaxError: '(' was never closed"),
    (None, "bad.py: no such file."),
])
def test_a_config_file_that_fails_is_one_line(tmp_path, text, message):
    config = tmp_path / "bad.py"
    if text is not None:
        config.write_text(text)
    out = _run(tmp_path / "run", config=str(config))
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert out.stderr.strip().splitlines()[-1] == f"train: --config={tmp_path / message}", out.stderr[-1500:]


@pytest.mark.parametrize("host", ["closed port", "tiny-shakespeare.invalid"])
def test_offline_first_run_fails_fast_naming_local_path(tmp_path, host):
    from lightjax.cloud.launch import free_port

    url = f"http://127.0.0.1:{free_port()}/input.txt" if host == "closed port" else f"https://{host}/input.txt"
    start = time.perf_counter()
    out = run_script("train.py", "--config", "configs/baseline.py", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.download_url={url}", timeout=60)
    assert time.perf_counter() - start < 15
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train: Cannot download Tiny Shakespeare from {url} (URLError: ")
    assert last.endswith("Without network, point --config.data.local_path at a copy of its input.txt.")


def test_download_from_a_mirror(tmp_path):
    """The download path end to end, from a file:// mirror (this machine has no network)."""
    out = run_script("train.py", "--config", "configs/smoke.py", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.download_url=file://{SHAKESPEARE}",
                     "--config.train.max_steps=2", "--config.optim.warmup_steps=1", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "tfds" / "lightjax_tiny_shakespeare" / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()
    assert len(_rows(tmp_path / "run")) >= 1


CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
    module = load_config_module(path)
    assert module.__doc__ and len(module.__doc__) > 80, f"{path.name} needs a docstring saying what it is for"
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    config = _load(path)
    if config.train.init_from:  # fine-tuning: the weights are the user's download, named in the error
        with pytest.raises(ConfigError, match=r"^config.train.init_from='[^']+' is not an export directory[^;]*\.$"):
            validate(config, device_count=1)
        config.train.init_from = ""
    validate(config, device_count=1)  # as on this CPU
    if path.stem in ("pythia_160m", "llama_1b", "pretrain_fineweb"):
        validate(config, device_count=8)  # and on the 8-device machines they are for


@pytest.mark.parametrize("name", ["pythia_160m", "llama_1b", "pretrain_fineweb"])
def test_hardware_configs_run_one_step_at_reduced_size(tmp_path, name):
    config = _load(ROOT / "configs" / f"{name}.py")
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i} " * 200)
    config.data.source, config.data.num_workers = f"text:{tmp_path}/corpus/*.txt", 0
    if name == "pretrain_fineweb":  # its own kind of source and tokenizer: Parquet files, a tokenizer.json
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [f"document {i} " * 200 for i in range(4)]}), tmp_path / "corpus.parquet",
                       row_group_size=2)
        config.data.source, config.data.val_fraction = f"parquet:{tmp_path}/*.parquet", 0.25
        config.data.tokenizer = f"hf:{ROOT / 'tests' / 'data' / 'tiny-llama-hf'}"
    config.data.seq_len, config.train.global_batch_size = 32, 8 * config.train.grad_accum_steps
    config.model.n_layer, config.model.n_embd, config.model.intermediate_size = 2, 64, None
    config.model.n_head = 4
    if name == "llama_1b":
        config.model.n_query_groups, config.model.intermediate_size = 2, 128
    config.model.vocab_size, config.model.padded_vocab_size = (320 if name == "pretrain_fineweb" else 257), 320
    config.train.max_steps, config.optim.warmup_steps, config.train.eval_batches = 1, 0, 1
    config.logging.progress = False
    summary = train(config, tmp_path / "run")
    assert summary["step"] == 1 and (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_validate_reports_every_problem_at_once():
    config = _load(ROOT / "configs" / "smoke.py")
    config.optim.lr, config.train.log_every = -1.0, 0
    with pytest.raises(ConfigError, match=r"config.optim.lr=-1.0 must be positive; .*config.train.log_every=0"):
        validate(config, device_count=1)


def _smoke_config(tmp_path, **train_kw):
    config = _load(ROOT / "configs" / "smoke.py")
    config.data.local_path, config.data.data_dir = str(SHAKESPEARE), str(tmp_path / "tfds")
    config.train.max_steps, config.train.log_every, config.train.eval_every = 6, 1, 0
    config.checkpoint.save_every, config.logging.progress = 3, False
    config.optim.lr, config.optim.min_lr, config.optim.warmup_steps = 1e30, 0.0, 0  # diverges at once
    for k, v in train_kw.items():
        setattr(config.train, k, v)
    return config


def test_non_finite_loss_stops_without_saving_it(tmp_path):
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(\w+\) at step \d; stopped without saving"):
        train(_smoke_config(tmp_path), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_skip_nonfinite_skips_the_update(tmp_path):
    """Every step after the first diverges and is skipped: the parameters saved at steps 3 and 6 are
    the same (an applied non-finite update would have made them NaN)."""
    import orbax.checkpoint as ocp

    summary = train(_smoke_config(tmp_path, skip_nonfinite=True), tmp_path / "run")
    rows = [r for r in _rows(tmp_path / "run") if "loss" in r]
    assert summary["step"] == 6 and [r["skipped"] for r in rows] == [False] + [True] * 5
    saved = {s: ocp.StandardCheckpointer().restore((tmp_path / "run" / "checkpoints" / str(s) / "state").absolute())
             for s in (3, 6)}
    for a, b in zip(jax.tree.leaves(saved[3]["params"]), jax.tree.leaves(saved[6]["params"]), strict=True):
        assert np.isfinite(a).all() and np.array_equal(a, b)


def test_cpu_data_parallelism_takes_the_cores_that_divide_the_batch(monkeypatch):
    import os

    from lightjax.runtime.cli import cpu_data_parallelism, host_devices
    from lightjax.train.config import default_config

    config = default_config()
    for cores, batch, accum, want in [(2, 32, 1, 2), (8, 12, 1, 6), (8, 12, 4, 3), (1, 32, 1, 1), (4, 7, 1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)))
        config.train.global_batch_size, config.train.grad_accum_steps = batch, accum
        assert cpu_data_parallelism(config) == want, (cores, batch, accum)
    config.train.global_batch_size, config.train.grad_accum_steps, config.mesh.fsdp = 32, 1, 2  # the user's mesh
    assert cpu_data_parallelism(config) == 1
    config.mesh.fsdp = 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 --xla_cpu_enable_fast_math=false")
    host_devices(0, config)  # a count already set wins
    assert os.environ["XLA_FLAGS"].count("device_count=3") == 1
    host_devices(5, config)  # --host_devices replaces it
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=5"
    monkeypatch.setenv("XLA_FLAGS", "")
    host_devices(0, config, multi_process=True)  # each process of a job keeps its one device
    assert os.environ["XLA_FLAGS"] == ""
    host_devices(0, config)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"

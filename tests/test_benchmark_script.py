"""scripts/benchmark.py end to end, in subprocesses (1 device, 8 simulated devices, a bad setting)."""

import json
import re

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

TINY = ["--config", "configs/baseline.py", "--config.model.n_layer=1", "--config.model.n_embd=64",
        "--config.model.n_head=4", "--config.data.seq_len=32", "--config.train.global_batch_size=8",
        "--steps=2", "--warmup=1"]


def _run(*args):
    return run_script("benchmark.py", *args, timeout=300)


def test_benchmark_one_device_json():
    out = _run(*TINY, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    r = json.loads(line)
    assert r["devices"] == 1 and r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    for key in ("compile_s", "step_ms", "tokens_per_s", "mfu", "argument_bytes_per_device", "temp_bytes_per_device"):
        assert r[key] > 0, key
    assert 1.02 < r["xla_flops_ratio"] < 1.16  # measured 1.089: softmax, norms and the optimizer on top


def test_benchmark_eight_devices_one_line_per_mesh():
    out = _run(*TINY, "--host_devices=8", "--meshes=8,1,1:1,8,1:2,2,2")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if "tok/s" in x]
    assert [x.split()[1] for x in lines] == ["mesh(data", "mesh(data", "mesh(data"]
    assert ["=8x1x1" in lines[0], "=1x8x1" in lines[1], "=2x2x2" in lines[2]] == [True] * 3
    assert all("MFU" in x and "args" in x for x in lines)


def test_benchmark_bad_setting_is_one_line():
    out = _run(*TINY, "--host_devices=8", "--config.mesh.data=8", "--config.train.global_batch_size=12")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "benchmark: config.train.global_batch_size=12 must be divisible by "
        "mesh.data*mesh.fsdp*train.grad_accum_steps = 8*1*1 = 8.")


@pytest.mark.parametrize("mode,pattern", [
    ("--generate=1,2", r"decode batch 1 \(lightjax\) \| \d+ new tokens after 16 \| [\d,]+ tok/s .*\n"
                       r".*decode batch 2 \(lightjax\) \|"),
    ("--checkpoint", r"each save blocked the loop \d+ ms \| restore \d+ ms \| checksums of the \d+ MiB state"),
    ("--data", r"data tiny_shakespeare tokenizer=char workers=0 \| prepared 1,003,854 tokens .*\n"
               r".*workers=2 \| prepared 1,003,854 tokens"),

    ("--serve --serve_requests=6 --serve_rate=50 --serve_slots=2",
     r"continuous \| 2 slots, 6 requests at 50/s, loguniform lengths \| [\d,]+ tokens/s \| first token p50 .* "
     r"the throughput, p99 latency [\d.]+x, [\d.]+x fewer decode steps\n.* static \| 2 slots, 6 requests"),
])
def test_benchmark_modes(tmp_path, mode, pattern):
    from tests.helpers import SHAKESPEARE

    out = _run(*TINY, *mode.split(), f"--config.data.local_path={SHAKESPEARE}", f"--config.data.data_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(pattern, out.stdout), out.stdout[-2000:]


def test_without_host_devices_a_cpu_run_gets_one_device_per_core():
    """No --host_devices and no device count in XLA_FLAGS: the default mesh trains data-parallel over
    one CPU device per core (as many as divide the batch), here and in scripts/train.py alike."""
    import subprocess
    import sys

    from lightjax.runtime.cli import cpu_data_parallelism
    from lightjax.train.config import default_config
    from tests.helpers import ROOT, script_env

    env = script_env()
    del env["XLA_FLAGS"]
    out = subprocess.run([sys.executable, "scripts/benchmark.py", *TINY, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    config = default_config()
    config.train.global_batch_size = 8
    assert json.loads(line)["devices"] == cpu_data_parallelism(config)

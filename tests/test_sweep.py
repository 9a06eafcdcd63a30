"""Sharding sweeps: rows of memory, collectives, estimated and measured step time per layout; a layout
that cannot work is a row with its reason and the sweep goes on."""

import json
import subprocess
import sys

import jax
import pytest
from etils import epath

from lightjax.perf.sweep import format_row, markdown, plot, settings, sweep
from tests.helpers import ROOT, SHAKESPEARE, tiny_run_config
from tests.test_hardware import _require_libtpu

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


def test_settings_are_every_combination():
    got = settings("8,1,1:1,8,1", "default,replicated", "none", "8,16")
    assert len(got) == 8 and got[0].mesh == (8, 1, 1) and {s.batch for s in got} == {8, 16}
    with pytest.raises(ValueError, match=r"--layouts='8,1': give 'data,fsdp,tensor' settings"):
        settings("8,1")


def test_sweep_on_local_devices_measures_beside_the_estimate(tmp_path):
    rows = sweep(tiny_run_config(), settings("8,1,1:1,8,1:1,1,8:3,1,1"), jax.devices(), measure_steps=1)
    good, bad = rows[:3], rows[3]
    for r in good:
        fast, slow = r["estimated_step_s"]
        assert r["total_bytes"] > 0 and 0 < fast <= slow and r["measured_step_s"] > 0
        assert r["xla_flops_per_device"] > 0 and 0 < r["estimated_mfu"][0] <= r["estimated_mfu"][1] <= 0.75
    assert good[0]["collectives"]["all-reduce"]["bytes"] > 0 and good[1]["collectives"]["all-gather"]["bytes"] > 0
    assert f"(MFU {100 * good[0]['measured_mfu']:.1f}%)" in format_row(good[0])  # the calibration point
    assert "has 3 positions but jax.device_count() is 8" in bad["error"]
    table = markdown(rows)
    assert table.count("\n") == 5 and "failed: config.mesh" in table
    assert {p.name for p in plot(rows, epath.Path(tmp_path))} == {"memory.png", "step_time.png"}


def test_one_device_compiles_with_no_collectives():
    (row,) = sweep(tiny_run_config(), settings("1,1,1"), jax.devices()[:1])
    assert "error" not in row and row["total_bytes"] > 0
    assert all(c["bytes"] == 0 for c in row["collectives"].values())


def test_a_layout_over_the_chips_memory_does_not_fit_and_the_sweep_goes_on():
    from lightjax.runtime.hardware import tpu_topology

    _require_libtpu()
    c = tiny_run_config(scan_layers=True)
    c.model.vocab_size = 32000  # logits of 65,536 sequences: far over a v5e chip's 16 GB
    rows = sweep(c, settings("1,4,1", batches="65536,8"), tpu_topology("v5e:2x2").devices())
    assert rows[0]["fits"] is False and "RESOURCE_EXHAUSTED" in rows[0]["error"] and "exceeds" in rows[0]["error"]
    assert rows[1]["fits"] is True and rows[1]["hbm_bytes"] == 15.75 * 2**30 and "measured_step_s" not in rows[1]
    assert rows[1]["total_bytes"] > rows[1]["argument_bytes"] > 0  # the compiled program's peak


def test_shard_sweep_script(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    listed = subprocess.run([sys.executable, "scripts/shard_sweep.py", "--topology=list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "https://cloud.google.com/tpu/docs/v5e" in listed.stdout
    out = subprocess.run([sys.executable, "scripts/shard_sweep.py", "--config=configs/smoke.py", "--host_devices=8",
                          "--layouts=2,2,2", "--steps=1", f"--out={tmp_path}",
                          f"--config.data.local_path={SHAKESPEARE}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["mesh"] for r in rows] == [{"data": 2, "fsdp": 2, "tensor": 2}] and rows[0]["measured_step_s"] > 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "memory.png").exists()
    bad = subprocess.run([sys.executable, "scripts/shard_sweep.py", "--layouts=8,1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("shard_sweep: --layouts='8,1'")


@pytest.mark.parametrize("where", ["cpu", "v5e:2x2"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_analytic_work_and_xla_agree_on_a_scanned_stack(remat, where):
    """A scanned stack of 6 layers of known matmuls, rematerialised or not: the row's analytic count of the
    compiled work and XLA's agree within 10% (with remat full the work is 1.2x the model's: ignoring the
    recompute would miss by that much), on this CPU and compiled for a TPU slice with tensor parallelism
    (whose program writes attention's matmuls as convolutions over dilated inputs)."""
    c = tiny_run_config(scan_layers=True, remat=remat)
    c.model.n_layer = 6
    if where == "cpu":
        (row,) = sweep(c, settings("1,1,1"), jax.devices()[:1])
    else:
        from lightjax.runtime.hardware import tpu_topology

        _require_libtpu()
        c.data.seq_len, c.model.block_size, c.train.attention = 256, 256, "xla"  # attention: 40% of the work
        (row,) = sweep(c, settings("1,2,2", batches="8"), tpu_topology(where).devices())
    assert abs(row["xla_flops_per_device"] / row["work_flops_per_device"] - 1) < 0.10, row
    assert not row["flops_flag"]
    if remat == "full":
        assert row["work_flops_per_device"] / row["model_flops_per_device"] > 1.15


def test_a_two_slice_mesh_compiles_and_its_gradient_reduction_crosses_the_data_center_network():
    """2 x v5e:2x2 (8 chips in two slices): the data axis spans the slices; the gradient all-reduce over it
    crosses the data-center network, the fsdp all-gathers stay inside each slice."""
    from lightjax.runtime.hardware import tpu_topology

    _require_libtpu()
    devices = tpu_topology("2xv5e:2x2").devices()
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    (row,) = sweep(tiny_run_config(scan_layers=True), settings("2,4,1"), devices)
    assert "error" not in row, row.get("error")
    col = row["collectives"]
    assert col["all-reduce"]["dcn_bytes"] > 0 and col["all-gather"]["bytes"] > 0 == col["all-gather"]["dcn_bytes"]
    assert row["dcn_bytes"] > 0 and "over the data-center network" in format_row(row)


def test_compare_prints_the_cheapest_layout_that_fits_on_each_slice():
    from lightjax.perf.compare import compare, compare_lines

    _require_libtpu()
    c = tiny_run_config(scan_layers=True)
    summaries = compare(c, ["v5e:2x2", "v6e:2x2"], batch=8, train_tokens=1e9)
    assert [s["topology"] for s in summaries] in (["v5e:2x2", "v6e:2x2"], ["v6e:2x2", "v5e:2x2"])
    costs = [max(s["usd_per_million_tokens"]) for s in summaries]
    assert costs == sorted(costs) and all(s["fits"] for s in summaries)
    lines = compare_lines(summaries).splitlines()
    assert len(lines) == 2 and all("per 1M tokens" in line and "days" in line for line in lines)


def test_a_given_chip_hour_price_replaces_the_list_price():
    from lightjax.perf.costs import PRACTICE
    from lightjax.perf.estimate import prices

    v5e = PRACTICE["TPU v5e"]
    listed = prices(8192, 4, (1.0, 2.0), v5e)
    given = prices(8192, 4, (1.0, 2.0), v5e, chip_hour_price=0.6)
    assert listed["tokens_per_s_per_chip"] == given["tokens_per_s_per_chip"] == (2048.0, 1024.0)
    assert listed["usd_per_million_tokens"] == pytest.approx((1.20 / 3600 / 2048 * 1e6, 1.20 / 3600 / 1024 * 1e6))
    assert given["usd_per_million_tokens"] == pytest.approx(tuple(x / 2 for x in listed["usd_per_million_tokens"]))
    assert "on-demand" in listed["price"] and given["price"] == "$0.60/chip-hour (given with --chip_hour_price)"
    assert "usd_per_million_tokens" not in prices(8192, 4, (1.0, 2.0), PRACTICE["H200"])  # no price recorded
    assert prices(8192, 4, (1.0, 2.0), None, chip_hour_price=1.0)["usd_per_million_tokens"][0] > 0


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_preference_run_sweeps_with_its_reference(tmp_path, lora_rank):
    """DPO's step (pair rows; for full tuning the reference parameters beside the state) compiles and runs
    in a sweep; full tuning's arguments hold the reference, one more copy of the parameters."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    c = tiny_run_config()
    c.lora.rank = lora_rank
    (plain,) = sweep(c, settings("1,8,1"), jax.devices())
    c.data.source = f"jsonl:{pairs}"
    (row,) = sweep(c, settings("1,8,1"), jax.devices(), measure_steps=1)
    assert "error" not in row and row["measured_step_s"] > 0, row.get("error")
    grown = row["argument_bytes"] - plain["argument_bytes"]
    params = plain["output_bytes"] / 3  # parameters and AdamW's two moments, float32 (full tuning)
    assert grown == pytest.approx(params, rel=0.05) if not lora_rank else abs(grown) < 1024

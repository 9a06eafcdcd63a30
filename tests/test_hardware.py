"""The chip table and TPU slice names; compile-only devices of a slice from libtpu."""

import os

import pytest

from lightjax.runtime.hardware import CHIPS, chip_for, topology_table, tpu_topology


@pytest.mark.parametrize("kind,chip", [("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"),
                                       ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"),
                                       ("NVIDIA H100 80GB HBM3", "H100"), ("cpu", None)])
def test_device_kinds_find_their_chip(kind, chip):
    assert (chip_for(kind).name if chip_for(kind) else None) == chip


@pytest.mark.parametrize("name,grid", [("v5e-16", (4, 4)), ("v5e:2x2", (2, 2)), ("v6e-8", (2, 4)),
                                       ("v5p-8", (2, 2, 1)), ("v4-16", (2, 2, 2)), ("v5p:2x2x4", (2, 2, 4))])
def test_slice_names(name, grid):
    assert tpu_topology(name).grid == grid


@pytest.mark.parametrize("name,message", [("v7x-8", "is not a TPU slice like v5e-16"), ("v5e:2x2x2", "2-dimensional"),
                                          ("v5e-12", "no usual v5e slice of 12 chips")])
def test_bad_slice_names(name, message):
    with pytest.raises(ValueError, match=message):
        tpu_topology(name)


def test_table_lists_every_chip_with_its_source():
    table = topology_table()
    assert all(c.name in table and c.source in table for c in CHIPS.values())


def test_compile_only_devices_of_a_slice():
    _require_libtpu()
    devices = tpu_topology("v5e:2x2").devices()
    assert len(devices) == 4 and chip_for(devices[0].device_kind).name == "TPU v5e"
    assert len(tpu_topology("v4:2x2x1").devices()) == 4  # one device per chip (megacore)
    assert len(tpu_topology("v5e-1").devices()) == 1  # a slice smaller than a host's 2x2 chips


@pytest.mark.parametrize("shape", [(2, 8, 1), (1, 8, 2), (4, 4, 1)])
def test_a_mesh_axis_may_span_parts_of_two_rings(shape):
    """On a 4x4 v6e slice an axis of 8 is half the chips; jax.make_mesh refuses it outside v5e."""
    from lightjax.runtime.sharding import make_mesh

    _require_libtpu()
    devices = tpu_topology("v6e:4x4").devices()
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), devices)
    assert mesh.devices.shape == shape and sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def _require_libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        if os.environ.get("LIGHTJAX_REQUIRE_TPU_COMPILER") == "1":
            pytest.fail("LIGHTJAX_REQUIRE_TPU_COMPILER=1 but libtpu is missing (pip install -e '.[aot]').")
        pytest.skip("libtpu not installed (pip install -e '.[aot]')")


@pytest.mark.parametrize("mesh", [(4, 1, 1), (1, 4, 1), (1, 2, 2)])
def test_train_step_compiles_for_a_tpu_slice(mesh):
    """The real train step of a tiny model, compiled for v5e:2x2 on this CPU machine: abstract state
    only (nothing runs on the compile-only devices), memory and collectives read from the program."""
    import jax
    import numpy as np

    from lightjax.model.flops import flops_per_token
    from lightjax.runtime.hlo import collectives, compiled_flops, partitioned_text
    from lightjax.runtime.sharding import batch_sharding
    from lightjax.train.run import build_run
    from tests.helpers import tiny_run_config

    _require_libtpu()
    config = tiny_run_config(mesh=mesh, scan_layers=True)
    training = build_run(config, tpu_topology("v5e:2x2").devices())
    tokens = jax.ShapeDtypeStruct((8, 17), np.int32, sharding=batch_sharding(training.mesh))
    compiled, text = partitioned_text(training.train_step.lower(training.abstract_state, {"tokens": tokens}))
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.output_size_in_bytes > 0
    model_flops = flops_per_token(training.model.config, 16) * 8 * 16 / 4
    # Per chip, the scanned stack counted per layer (measured 1.08-1.17; once per stack it would be ~0.55).
    assert 0.95 < compiled_flops(compiled) / model_flops < 1.25
    sent = collectives(text)
    if mesh[1] == 4:
        assert sent["all-gather"]["bytes"] > 0 and sent["reduce-scatter"]["bytes"] > 0
    else:
        assert sent["all-reduce"]["bytes"] > 0

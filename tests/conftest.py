"""Test setup: 8 simulated CPU devices (set before JAX is imported), the local-data gate, and the
uninterrupted reference run."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


def pytest_runtest_setup(item):
    """Tests marked `shakespeare` need the local Tiny Shakespeare copy (nothing is downloaded in tests):
    skipped where it is missing, a failure in CI (LIGHTJAX_REQUIRE_DATA=1)."""
    from tests.helpers import SHAKESPEARE

    if item.get_closest_marker("shakespeare") and not SHAKESPEARE.is_file():
        reason = f"the Tiny Shakespeare copy {SHAKESPEARE} is missing"
        if os.environ.get("LIGHTJAX_REQUIRE_DATA") == "1":
            pytest.fail(f"LIGHTJAX_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny run of tests/runs.py trained 12 steps without interruption: what a resumed run must equal."""
    from lightjax.train.trainer import train
    from tests.runs import run_config

    workdir = tmp_path_factory.mktemp("full")
    train(run_config(workdir), workdir / "run")
    return workdir / "run"

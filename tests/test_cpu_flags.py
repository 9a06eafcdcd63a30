"""The XLA:CPU options lightjax sets for itself: added on import, a user's own value left alone."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, script_env

SHOW = "import os, lightjax; print(os.environ['XLA_FLAGS'])"


@pytest.mark.parametrize("before,after", [
    ("", "--xla_cpu_multi_thread_eigen=false"),
    ("--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=2 "
                                                 "--xla_cpu_multi_thread_eigen=false"),
    ("--xla_cpu_multi_thread_eigen=true", "--xla_cpu_multi_thread_eigen=true"),
])
def test_import_adds_the_cpu_flags_unless_set(before, after):
    env = {**script_env(), "XLA_FLAGS": before}
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == after

"""Packages: a missing one is named with its install command, and a machine without a TPU starts quietly
with the TPU compiler installed."""

import importlib.util
import os
import subprocess
import sys

import pytest

from lightjax.runtime.packages import install_command
from tests.helpers import ROOT, script_env

# Run at interpreter start (as sitecustomize): every module named in HIDE_MODULES fails to import, as
# when its package is not installed.
_HIDE = """import os, sys
class _Hide:
    hidden = set(os.environ["HIDE_MODULES"].split(","))
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Hide())
"""


def _without(tmp_path, modules, script, *args):
    """scripts/<script> with `modules` not importable."""
    (tmp_path / "hide").mkdir(exist_ok=True)
    (tmp_path / "hide" / "sitecustomize.py").write_text(_HIDE)
    env = script_env()
    env["PYTHONPATH"] = f"{tmp_path / 'hide'}{os.pathsep}{env['PYTHONPATH']}"
    env["HIDE_MODULES"] = ",".join(modules)
    return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_install_commands_come_from_the_declared_requirements():
    assert install_command("jinja2") == "pip install -e ."  # a dependency
    assert install_command("orbax.checkpoint") == "pip install -e ."  # distribution orbax-checkpoint
    assert install_command("transformers.models") == 'pip install -e ".[torch]"'  # an extra's
    assert install_command("wandb") == 'pip install -e ".[wandb]"'
    assert install_command("no_such_package_anywhere") == "pip install no_such_package_anywhere"


def test_a_dependency_missing_while_the_config_loads_is_named_with_its_install_command(tmp_path):
    """configs/baseline.py imports lightjax.train.config, which needs jinja2 (the fresh-machine failure)."""
    out = _without(tmp_path, ["jinja2"], "train.py", "--config", "configs/baseline.py")
    assert out.returncode == 2, out.stderr
    assert out.stderr == ("train: the package jinja2 is not installed (No module named 'jinja2'); install it "
                          "with: pip install -e .\n")
    assert out.stdout == ""


def test_a_config_importing_an_extras_package_names_the_extra(tmp_path):
    config = tmp_path / "needs_torch.py"
    config.write_text("import torch\n\nfrom lightjax.train.config import default_config\n\n\n"
                      "def get_config():\n    return default_config()\n")
    out = _without(tmp_path, ["torch"], "train.py", "--config", str(config))
    assert out.returncode == 2, out.stderr
    assert out.stderr == ("train: the package torch is not installed (No module named 'torch'); install it "
                          'with: pip install -e ".[torch]"\n')


def test_a_package_missing_after_the_flags_is_one_line_too(tmp_path):
    """generate.py imports the library in main(), after parsing its flags."""
    out = _without(tmp_path, ["jinja2"], "generate.py", "--workdir", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == ["generate: the package jinja2 is not installed (No module named 'jinja2'); "
                                       "install it with: pip install -e ."]


def test_a_cpu_machine_with_the_tpu_compiler_starts_with_the_scripts_own_line(tmp_path):
    """With libtpu installed (.[aot]) and no TPU attached, JAX would load libtpu, which prints its
    warnings before anything else; the scripts keep JAX on the CPU there."""
    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("LIGHTJAX_REQUIRE_TPU_COMPILER") == "1":
            pytest.fail("LIGHTJAX_REQUIRE_TPU_COMPILER=1 but libtpu is not installed")
        pytest.skip("libtpu (the .[aot] extra) is not installed")
    env = {k: v for k, v in script_env().items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "scripts/smoke_test.py", "--config.train.max_steps=3",
                          "--config.optim.warmup_steps=1",
                          "--min_reduction=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TPU" not in out.stderr + out.stdout and "libtpu" not in out.stderr + out.stdout, out.stderr[:1000]

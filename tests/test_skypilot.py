"""The SkyPilot task files (skypilot/*.yaml) read by SkyPilot's own parser (`sky.Task.from_yaml_config`, with
the command line's --env overrides): resources, failover candidates, spot recovery, the bucket mount, setup
and run. SkyPilot lives in its own environment (LIGHTJAX_SKY_PYTHON, as .ci/run makes it; its pins conflict
with the Hugging Face hub's); no cloud is reached. The node environment's wiring is tests/test_multihost.py's."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lightjax.cloud.launch import free_port
from tests.helpers import ROOT

READ = """
import json, sys, yaml
import sky
out = {}
for path in sys.argv[1:]:
    sky.Task.from_yaml(path)  # as `sky launch PATH` reads it
    config = yaml.safe_load(open(path))
    task = sky.Task.from_yaml_config(config, env_overrides=[("BUCKET", "my-runs"), ("CONFIG", "configs/smoke.py")])
    resources = sorted(task.resources, key=str)
    storage = task.storage_mounts["/checkpoints"]
    out[path] = {"num_nodes": task.num_nodes, "envs": task.envs, "setup": task.setup, "run": task.run,
                 "clouds": sorted({str(r.cloud) for r in resources}),
                 "accelerators": sorted({k for r in resources for k in r.accelerators}),
                 "spot": sorted({r.use_spot for r in resources}), "recovery": resources[0].job_recovery,
                 "bucket": storage.name, "mode": storage.mode.value, "workdir": task.workdir}
print(json.dumps(out))
"""


def _sky_python():
    """The Python that has SkyPilot: LIGHTJAX_SKY_PYTHON, else the checkout's .sky-venv; skipped without one
    locally, a failure in CI (LIGHTJAX_REQUIRE_SKY=1)."""
    python = os.environ.get("LIGHTJAX_SKY_PYTHON") or str(ROOT / ".sky-venv" / "bin" / "python")
    if Path(python).is_file():
        return python
    reason = "no Python with SkyPilot (set LIGHTJAX_SKY_PYTHON; `python -m venv .sky-venv && .sky-venv/bin/pip " \
             "install skypilot==0.14.1`)"
    if os.environ.get("LIGHTJAX_REQUIRE_SKY") == "1":
        pytest.fail(f"LIGHTJAX_REQUIRE_SKY=1 but {reason}")
    pytest.skip(reason)


def test_the_task_files_parse_with_skypilot_and_say_what_they_promise():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "skypilot").glob("*.yaml"))
    assert files == ["skypilot/train.yaml", "skypilot/train_spot.yaml"]
    out = subprocess.run([_sky_python(), "-c", READ, *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tasks = json.loads(out.stdout.strip().splitlines()[-1])
    for path, t in tasks.items():
        assert t["num_nodes"] == 1 and t["accelerators"] == ["A100-80GB", "H100"], (path, t)
        assert (t["bucket"], t["mode"]) == ("my-runs", "MOUNT_CACHED")  # the --env override reaches the mount
        assert t["envs"]["CONFIG"] == "configs/smoke.py" and t["workdir"] == "."
        assert 'pip install -e ".[cuda]"' in t["setup"]
        assert t["run"].strip() == ('python scripts/train.py --config "$CONFIG" --workdir "/checkpoints/$RUN" '
                                    "--distributed $OVERRIDES")
    on_demand, spot = tasks["skypilot/train.yaml"], tasks["skypilot/train_spot.yaml"]
    assert on_demand["clouds"] == ["AWS", "GCP", "Kubernetes", "Lambda", "RunPod"] and on_demand["spot"] == [False]
    assert spot["spot"] == [True] and spot["recovery"] == {"strategy": "EAGER_NEXT_REGION",
                                                           "max_restarts_on_errors": 3}


@pytest.mark.shakespeare
def test_the_run_line_takes_every_flag_it_passes(tmp_path):
    """The task's run line, with the bucket's path swapped for a local folder and a tiny run's overrides,
    trains through scripts/train.py as a 1-node SkyPilot job would (the node environment of rank 0 of 1)."""
    from tests.helpers import SHAKESPEARE, script_env

    run = (ROOT / "skypilot" / "train.yaml").read_text().split("run: |", 1)[1].strip()
    env = {**script_env(), "CONFIG": "configs/smoke.py", "RUN": "smoke", "SKYPILOT_NODE_RANK": "0",
           "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1", "LIGHTJAX_COORDINATOR_PORT": str(free_port()),
           "OVERRIDES": f"--config.train.max_steps=2 --config.optim.warmup_steps=1 "
                        f"--config.data.local_path={SHAKESPEARE} --config.data.data_dir={tmp_path / 'tfds'} "
                        "--config.logging.progress=False"}
    out = subprocess.run(["bash", "-c", run.replace("/checkpoints", str(tmp_path))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "smoke" / "checkpoints" / "2").is_dir()

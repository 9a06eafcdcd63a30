"""Every mistaken or unusual input of the newer features ends as one line naming the value (or works):
instruction records of any JSON type, templates, splits, generation settings, sweeps, multi-host flags
and the TPU VM client. Each case: the exit status, the one line, and nothing written where nothing
should be."""

import json
import shutil
from pathlib import Path

import pytest

from lightjax.train.trainer import train
from tests.helpers import ROOT, run_script
from tests.runs import run_config

pytestmark = pytest.mark.shakespeare

RECORDS = [{"instruction": f"add {i} and {i}", "output": f"{2 * i}"} for i in range(24)]


def _records(path: Path, records: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain tiny run (checkpoints at 2 and 4) and a char-level LoRA run on instruction records whose
    tokenizer (its records' characters) is smaller than the model's 65-slot vocabulary."""
    tmp = tmp_path_factory.mktemp("mistakes")
    train(run_config(tmp, max_steps=4, save_every=2), tmp / "plain")
    c = run_config(tmp, max_steps=4, save_every=0, eval_every=4)
    c.data.source, c.data.local_path = f"jsonl:{_records(tmp / 'records.jsonl', RECORDS)}", ""
    c.model.block_size, c.data.seq_len = 256, 256
    c.lora.rank = 4
    train(c, tmp / "lora")
    return tmp


def _one_line(out, status, *words):
    assert out.returncode == status, (out.returncode, out.stderr[-1500:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-1500:]
    for word in words:
        assert word in lines[0], lines[0]


def _train(tmp, source, *extra, tokenizer="byte", vocab_size=257):
    """A 2-step tiny run on `source`."""
    return run_script("train.py", "--config", "configs/smoke.py", f"--workdir={tmp / 'run'}",
                      f"--config.data.source={source}", f"--config.data.tokenizer={tokenizer}",
                      f"--config.model.vocab_size={vocab_size}", "--config.data.seq_len=256",
                      "--config.model.block_size=256", "--config.train.max_steps=2", "--config.optim.warmup_steps=1",
                      "--config.train.global_batch_size=2", "--config.logging.progress=False", *extra)


BAD_RECORDS = {
    "output null": ({"instruction": "x", "output": None}, "'output' is null; it must be a string"),
    "output a number": ({"instruction": "x", "output": 5}, "'output' is a number"),
    "output a list": ({"instruction": "x", "output": ["a"]}, "'output' is a list"),
    "instruction 7": ({"instruction": 7, "output": "y"}, "'instruction' is a number"),
    "chat content null": ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
                          "messages[0].content is null"),
    "chat image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]},
                                      {"role": "assistant", "content": "y"}]}, "kinds ['image_url']"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_record_of_the_wrong_type_is_named_with_its_file_and_line(tmp_path, case):
    record, words = BAD_RECORDS[case]
    path = _records(tmp_path / "data.jsonl", RECORDS[:10] + [record] + RECORDS[10:])
    _one_line(_train(tmp_path, f"jsonl:{path}"), 1, f"{path}:11", words)


def test_chat_parts_and_the_jsonl_prefix_on_a_txt_file_train(tmp_path):
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": r["instruction"]}]},
                           {"role": "assistant", "content": [{"type": "text", "text": r["output"]}]}]} for r in RECORDS]
    out = _train(tmp_path, f"jsonl:{_records(tmp_path / 'records.txt', parts)}")
    assert out.returncode == 0, out.stderr[-1500:]


def test_a_latin1_file_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_records(tmp_path / "x", RECORDS).read_bytes() + '{"instruction": "caf\xe9", "output": "x"}\n'
                     .encode("latin-1"))
    _one_line(_train(tmp_path, f"jsonl:{path}"), 1, str(path), "not UTF-8", "0xe9")


def test_a_chat_template_that_does_not_parse_is_named(tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(ROOT / "tests" / "data" / "tiny-llama-hf", hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% if messages %}"}))
    out = _train(tmp_path, f"jsonl:{_records(tmp_path / 'r.jsonl', RECORDS)}", "--config.data.prompt_style=chat",
                 tokenizer=f"hf:{hf}", vocab_size=320)
    _one_line(out, 1, f"{hf / 'tokenizer_config.json'}", "does not parse")


def test_evaluate_names_only_splits_the_source_has(runs):
    before = (runs / "lora" / "metrics.jsonl").read_bytes()
    _one_line(run_script("evaluate.py", f"--workdir={runs / 'lora'}", "--split=test"), 1, "no 'test' split",
              "train, validation")
    assert (runs / "lora" / "metrics.jsonl").read_bytes() == before


def test_generating_with_a_tokenizer_smaller_than_the_model(runs):
    """The LoRA run's char tokenizer has fewer ids than the model has rows: ids past it are never sampled."""
    out = run_script("generate.py", f"--workdir={runs / 'lora'}", "--instruction", "--prompt=add 3 and 3",
                     "--temperature=1.5", "--num_samples=4", "--max_new_tokens=20")
    assert out.returncode == 0, out.stderr[-1500:]


GENERATE = {
    "--instruction on a plain run": (["--instruction"], "not on instruction records"),
    "--num_samples 0": (["--num_samples=0"], "--num_samples=0"),
}


@pytest.mark.parametrize("case", GENERATE)
def test_generate_names_the_mistake(runs, case):
    flags, words = GENERATE[case]
    _one_line(run_script("generate.py", f"--workdir={runs / 'plain'}", "--prompt=ROMEO:", *flags), 1 if
              case.startswith("--instruction") else 2, words)


@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_reading_a_missing_workdir_creates_nothing(tmp_path, script):
    flags = ["--prompt=x"] if script == "generate.py" else []
    _one_line(run_script(script, f"--workdir={tmp_path / 'nowhere'}", *flags), 1, "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(runs, tmp_path):
    copy = tmp_path / "plain"
    shutil.copytree(runs / "plain", copy)
    meta = copy / "checkpoints" / "4" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:100])
    out = run_script("evaluate.py", f"--workdir={copy}", "--batches=1")
    said, result = out.stdout.splitlines()
    assert out.returncode == 0 and result.startswith("step 2 |"), out.stderr[-1500:]
    assert "checkpoints/4 cannot be read" in said and "using the one before it" in said
    assert len(meta.read_text()) == 100  # the run is only read


def test_prepare_data_on_text_and_instruction_sources(runs):
    for kind, source in (("text", f"text:{runs / 'records.jsonl'}"), ("jsonl", f"jsonl:{runs / 'records.jsonl'}")):
        out = run_script("prepare_data.py", "--config", "configs/smoke.py", f"--config.data.source={source}",
                         "--config.data.tokenizer=byte", "--config.data.text_field=output",
                         f"--config.data.tokens_dir={runs / 'prepared' / kind}", "--config.logging.progress=False")
        splits = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
        assert out.returncode == 0 and splits == ["train", "validation"], out.stderr[-1500:]


SWEEP = {
    "a layout that does not use the devices": (["--layouts=4,4,1"], "4,4,1 does not use the 8 devices"),
    "a negative batch": (["--layouts=8,1,1", "--batch=-8"], "must be positive (got -8)"),
    "an unknown remat policy": (["--layouts=8,1,1", "--remat=fulll"], "'fulll' is not one of"),
    "a price that is not one": (["--layouts=8,1,1", "--chip_hour_price=-1"], "=-1.0 must be a positive"),
}


@pytest.mark.parametrize("case", SWEEP)
def test_a_sweep_refuses_settings_that_cannot_work(tmp_path, case):
    flags, words = SWEEP[case]
    out = run_script("shard_sweep.py", "--config", "configs/smoke.py", f"--out={tmp_path / 'sweep'}", *flags,
                     devices=8)
    _one_line(out, 1, words)
    assert not (tmp_path / "sweep").exists()


COORDINATOR = {
    "no port": ("localhost", "is not HOST:PORT"),
    "an unknown host": ("no-such-host.invalid:1234", "is unknown"),
    "nobody there": ("127.0.0.1:1", "Could not reach the coordinator at --coordinator_address=127.0.0.1:1 within 3 s"),
}


@pytest.mark.parametrize("case", COORDINATOR)
def test_a_coordinator_that_cannot_be_reached_is_one_line_within_the_heartbeat(tmp_path, case):
    address, words = COORDINATOR[case]
    out = run_script("train.py", "--config", "configs/smoke.py", f"--workdir={tmp_path / 'run'}",
                     f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
                     "--heartbeat_timeout_s=3", timeout=60)
    _one_line(out, 1, words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,ok", [
    (["python3", "scripts/train.py", "--config", "configs/baseline.py"], False),
    (["python3", "-u", "scripts/train.py", "--distributed=true"], True),
    (["scripts/train.py", "--distributed=false"], False),
])
def test_tpu_vm_checks_the_train_command_however_it_is_written(command, ok):
    out = run_script("tpu_vm.py", "run", "--name=lj", "--zone=z", "--accelerator=v5litepod-16",
                     "--workdir=gs://b/run", "--dry_run", "--", *command)
    if ok:
        assert out.returncode == 0 and "--distributed=true" in out.stdout, out.stderr
    else:
        _one_line(out, 2, "add --distributed")


def test_lora_without_pretrained_weights_warns(tmp_path, capsys):
    c = run_config(tmp_path, max_steps=2, save_every=0)
    c.lora.rank = 4
    train(c, tmp_path / "run")
    assert "WARNING: config.lora.rank=4 without config.train.init_from" in capsys.readouterr().out


def test_a_sweep_with_a_failed_setting_exits_non_zero_unless_allowed(tmp_path):
    """tensor=8 cannot split the smoke model's 4 heads: a failed row (not one that does not fit)."""
    args = ("shard_sweep.py", "--config", "configs/smoke.py", "--layouts=8,1,1:1,1,8", "--steps=0")
    out = run_script(*args, f"--out={tmp_path / 'a'}", devices=8)
    assert out.returncode == 1 and "1 of 2 settings failed (1x1x8" in out.stderr, out.stderr[-1500:]
    assert (tmp_path / "a" / "results.md").is_file()  # the results are written all the same
    assert run_script(*args, f"--out={tmp_path / 'b'}", "--allow_failures", devices=8).returncode == 0

"""Benchmark the train step of a config on this machine's devices.

    python scripts/benchmark.py --config configs/baseline.py
    python scripts/benchmark.py --config configs/baseline.py --host_devices=8 --meshes=8,1,1:1,8,1:2,2,2
    python scripts/benchmark.py --config configs/baseline.py --config.train.dtype=bfloat16 --json

    python scripts/benchmark.py --config configs/baseline.py --data --config.data.local_path=input.txt
    python scripts/benchmark.py --make_corpus=/tmp/corpus --corpus_mb=92 --corpus_files=100 \
        --config.data.local_path=input.txt                   # a corpus and a byte-level BPE tokenizer, then:
    python scripts/benchmark.py --prepare --config.data.source='text:/tmp/corpus/*.txt' \
        --config.data.tokenizer=hf:/tmp/corpus/bpe            # tokenizing it ahead of training, four ways
    python scripts/benchmark.py --config configs/baseline.py --generate=1,8
    python scripts/benchmark.py --config configs/baseline.py --vs_torch   # the same step in PyTorch beside it
    python scripts/benchmark.py --harness --harness_model=pythia-70m --config.data.local_path=input.txt
    python scripts/benchmark.py --config configs/baseline.py --serve --serve_rate=8

Prints one line per mesh setting (or one JSON object per line with --json); --data measures the
data pipeline's tokens/s with 0 and 2 worker processes instead; --prepare the tokens/s of preparing
the data (scripts/prepare_data.py) on one core, on every core, and as one process per core, beside a
plain one-core loop of the tokenizer (lightjax/perf/prepare_bench.py); --generate=1,8 decoding tokens/s;
--profile prints where the step's time goes; --harness the requests/s of lm-evaluation-harness tasks
answered by lightjax and by the harness's hf backend on one random model (lightjax/perf/harness_bench.py);
--serve the tokens/s and latencies of serving a trace of requests with continuous batching beside one batch at
a time (lightjax/perf/serve_bench.py);
--vs_torch alternates this benchmark with the same architecture and batch trained in PyTorch
(`transformers`' implementation, torch's AdamW and clipping), each in its own process, and prints both
medians and the ratio.
"""

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import host_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/baseline.py", "Run config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per setting instead of a text line.")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "CPU devices (sets XLA_FLAGS); 0: one per core where the "
                                     "run can train data-parallel over them (lightjax.runtime.cli.host_devices).")
_DATA = flags.DEFINE_bool("data", False, "Benchmark the data pipeline instead (0 and 2 workers).")
_PREPARE = flags.DEFINE_bool("prepare", False, "Benchmark preparing the data (tokenizing the training split) "
                             "instead: a plain loop, and scripts/prepare_data.py on 1 core, all cores, "
                             "1 process per core.")
_PREPARE_WAYS = flags.DEFINE_list("prepare_ways", ["loop", "one", "workers", "processes"],
                                  "--prepare: which ways to run.")
_MAKE_CORPUS = flags.DEFINE_string("make_corpus", "", "Write a corpus of .txt files drawn from the config's "
                                   "training text, and a byte-level BPE tokenizer for it (DIR/bpe), into this folder.")
_CORPUS_MB = flags.DEFINE_float("corpus_mb", 92, "--make_corpus: its size in MB.")
_CORPUS_FILES = flags.DEFINE_integer("corpus_files", 100, "--make_corpus: how many files.")
_BPE_VOCAB = flags.DEFINE_integer("bpe_vocab", 8192, "--make_corpus: the BPE tokenizer's vocabulary.")
_CHECKPOINT = flags.DEFINE_bool("checkpoint", False, "Measure how long saves block the loop, and step time "
                                 "with and without saving every 10 steps.")
_GENERATE = flags.DEFINE_string("generate", "", "Benchmark decoding instead: batch sizes separated by ',' "
                                "(e.g. 1,8); 128 new tokens after 16-token prompts.")
_VS_TORCH = flags.DEFINE_bool("vs_torch", False, "Alternate with the same step in PyTorch; print both and the ratio.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "--vs_torch: rounds of (lightjax, PyTorch) runs.")
_PROFILE = flags.DEFINE_bool("profile", False, "Trace --steps steps with JAX's profiler and print where the "
                              "step's time goes, by part of the model (lightjax/perf/profile.py).")
_TORCH = flags.DEFINE_bool("torch", False, "Time the PyTorch step alone (what --vs_torch runs).")
_HARNESS = flags.DEFINE_bool("harness", False, "Benchmark lm-evaluation-harness requests/s against its hf backend.")
_HARNESS_MODEL = flags.DEFINE_string("harness_model", "pythia-70m", "--harness: the preset (random weights).")
_HARNESS_DOCS = flags.DEFINE_integer("harness_docs", 64, "--harness: documents of the choice task (a quarter as many "
                                     "rolling, half as many generation).")
_HARNESS_FEWSHOT = flags.DEFINE_integer("harness_fewshot", 0, "--harness: solved examples before each choice "
                                        "question (leaderboards use 5 to 25).")
_HARNESS_BATCH = flags.DEFINE_integer("harness_batch", 16, "--harness: rows per forward pass, both backends.")
_SERVE = flags.DEFINE_bool("serve", False, "Benchmark serving: continuous batching beside one batch at a time.")
_SERVE_REQUESTS = flags.DEFINE_integer("serve_requests", 64, "--serve: requests of the trace.")
_SERVE_RATE = flags.DEFINE_float("serve_rate", 8.0, "--serve: requests arriving per second.")
_SERVE_SLOTS = flags.DEFINE_integer("serve_slots", 8, "--serve: cache slots (requests decoded together).")
_SERVE_LENGTHS = flags.DEFINE_enum("serve_lengths", "loguniform", ["loguniform", "uniform"],
                                   "--serve: how completion lengths spread over 8 tokens to half the context.")
_MESHES = flags.DEFINE_string("meshes", "", "Settings to run, 'data,fsdp,tensor' separated by ':' "
                              "(default: the config's mesh).")


def main(argv):
    del argv
    host_devices(_HOST_DEVICES.value, _CONFIG.value)
    from lightjax.perf.benchmark import benchmark_data, benchmark_train_step, format_data_result, format_result
    from lightjax.train.config import ConfigError

    config = _CONFIG.value
    if _PROFILE.value:
        from lightjax.perf.profile import format_profile, profile_decode, profile_train_step

        batches = _generate_batches() if _GENERATE.value else []
        for r in [profile_decode(config, b) for b in batches] or [profile_train_step(config, steps=_STEPS.value)]:
            print(json.dumps(r) if _JSON.value else format_profile(r), flush=True)
        return
    if _MAKE_CORPUS.value or _PREPARE.value:
        _prepare(config)
        return
    if _HARNESS.value:
        _harness(config)
        return
    if _SERVE.value:
        from lightjax.perf import serve_bench

        results = serve_bench.compare(config, _SERVE_REQUESTS.value, _SERVE_RATE.value, _SERVE_SLOTS.value,
                                      _SERVE_LENGTHS.value)
        for r in results:
            baseline = None if r is results[1] else results[1]
            print(json.dumps(r) if _JSON.value else serve_bench.format_result(r, baseline), flush=True)
        return
    if _VS_TORCH.value or _TORCH.value:
        _vs_torch(config)
        return
    if _GENERATE.value:
        from lightjax.perf.benchmark import benchmark_generate

        for batch in _generate_batches():
            r = benchmark_generate(config, batch)
            print(json.dumps(r) if _JSON.value else _decode_line(r), flush=True)
        return
    if _CHECKPOINT.value:
        from lightjax.perf.benchmark import benchmark_checkpoint

        r = benchmark_checkpoint(config, steps=max(_STEPS.value, 10))
        print(json.dumps(r) if _JSON.value else
              f"{r['model']} async_save={r['async_save']} | step {r['step_ms_without_saves']:.1f} ms without saves, "
              f"{r['step_ms_with_saves']:.1f} ms saving every {r['save_every']} steps | each save blocked the loop "
              + ", ".join(f"{b:.0f} ms" for b in r["save_blocking_ms"])
              + f" | restore {r['restore_ms']:.0f} ms | checksums of the {r['state_mib']:.0f} MiB state "
              f"{r['digest_ms']:.1f} ms (in each save and restore)", flush=True)
        return
    if _DATA.value:
        for workers in (0, 2):
            try:
                result = benchmark_data(config, workers)
            except (OSError, ValueError) as e:
                sys.exit(f"benchmark: {e}")
            print(json.dumps(result) if _JSON.value else format_data_result(result), flush=True)
        return
    try:
        settings = [tuple(int(x) for x in s.split(",")) for s in _MESHES.value.split(":") if s]
        assert all(len(s) == 3 for s in settings)
    except (ValueError, AssertionError):
        sys.exit(f"benchmark: --meshes={_MESHES.value!r} is not 'data,fsdp,tensor' settings separated by ':'.")
    failed = False
    for shape in settings or [None]:
        if shape is not None:
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        try:
            result = benchmark_train_step(config, steps=_STEPS.value, warmup=_WARMUP.value)
        except (ConfigError, ValueError) as e:  # one line for this setting; the others still run
            print(f"benchmark: {e}", file=sys.stderr, flush=True)
            failed = True
            continue
        print(json.dumps(result) if _JSON.value else format_result(result), flush=True)
    sys.exit(1 if failed else 0)


def _prepare(config) -> None:
    from lightjax.perf import prepare_bench

    if _MAKE_CORPUS.value:
        from lightjax.data.sources import load_split

        train = load_split(config.data, "train")
        text = "".join(str(train[i]) for i in range(len(train)))
        files = prepare_bench.make_corpus(_MAKE_CORPUS.value, text, _CORPUS_MB.value, _CORPUS_FILES.value)
        bpe = prepare_bench.train_bpe(f"{_MAKE_CORPUS.value}/bpe", files[:4], _BPE_VOCAB.value)
        print(f"Wrote {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:,.1f} MB) and {bpe}; prepare "
              f"them with --config.data.source='text:{_MAKE_CORPUS.value}/*.txt' --config.data.tokenizer=hf:{bpe}")
        return
    argv = [a for a in sys.argv[1:] if a.startswith("--config")]
    ways = {"loop": lambda: prepare_bench.plain_loop(config),
            "one": lambda: prepare_bench.timed_prepare(argv, 1, 1, "prepare_data.py, 1 process, 1 core"),
            "workers": lambda: prepare_bench.timed_prepare(argv, 1, cores, f"prepare_data.py, 1 process, {cores} "
                                                           "worker processes"),
            "processes": lambda: prepare_bench.timed_prepare(argv, cores, 1, f"prepare_data.py, {cores} processes, "
                                                             "1 core each")}
    cores = len(os.sched_getaffinity(0))
    unknown = [w for w in _PREPARE_WAYS.value if w not in ways]
    if unknown:
        sys.exit(f"benchmark: --prepare_ways={','.join(unknown)} is not any of {', '.join(ways)}.")
    loop = None
    for way in _PREPARE_WAYS.value:
        r = ways[way]()
        r["tokens_per_s"], r["mb_per_s"] = r["tokens"] / r["seconds"], r["bytes"] / r["seconds"] / 1e6
        loop = loop or (r["tokens_per_s"] if way == "loop" else None)
        line = prepare_bench.format_prepare_result(r)
        print(json.dumps(r) if _JSON.value else line + (f" | {r['tokens_per_s'] / loop:.2f}x the plain loop"
                                                         if loop else ""), flush=True)


def _harness(config) -> None:
    import tempfile
    from pathlib import Path

    from lightjax.data.sources import load_split
    from lightjax.perf import harness_bench

    train = load_split(config.data, "train")
    text = "".join(str(train[i]) for i in range(len(train)))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "text.txt").write_text(text)
        model = harness_bench.write_model(Path(tmp) / "model", Path(tmp) / "text.txt", _HARNESS_MODEL.value)
        tasks = harness_bench.write_tasks(Path(tmp) / "tasks", text, _HARNESS_DOCS.value, _HARNESS_FEWSHOT.value)
        results = harness_bench.compare(model, tasks, _HARNESS_BATCH.value)
    baseline = results[1]["requests_per_s"]
    for r in results:
        print(json.dumps(r) if _JSON.value else harness_bench.format_result(r, None if r is results[1] else baseline),
              flush=True)


def _generate_batches() -> list[int]:
    try:
        batches = [int(b) for b in _GENERATE.value.split(",")]
        assert all(b > 0 for b in batches)
    except (ValueError, AssertionError):
        sys.exit(f"benchmark: --generate={_GENERATE.value!r} is not batch sizes > 0 separated by ',' (e.g. 1,8,32).")
    return batches


def _decode_line(r) -> str:
    who = "lightjax" if r.get("framework", "lightjax") == "lightjax" else f"{r['framework']} {r['hf_class']}.generate"
    return (f"{r['model']} decode batch {r['batch']} ({who}) | {r['new_tokens']} new tokens after {r['prompt_len']} "
            f"| {r['tokens_per_sec']:,.0f} tok/s ({r['ms_per_step']:.2f} ms per step) | first call "
            f"{r['first_call_s']:.1f} s")


def _vs_torch(config) -> None:
    from lightjax.perf.vs_torch import benchmark_torch_generate, benchmark_torch_train_step, side_by_side

    if _GENERATE.value:
        batches = _generate_batches()
    try:
        if _TORCH.value and _GENERATE.value:
            for batch in batches:
                r = benchmark_torch_generate(config, batch)
                print(json.dumps(r) if _JSON.value else _decode_line(r), flush=True)
            return
        if _TORCH.value:
            r = benchmark_torch_train_step(config, steps=_STEPS.value, warmup=_WARMUP.value)
            print(json.dumps(r) if _JSON.value else f"{r['framework']} {r['hf_class']} ({r['attention']} attention, "
                  f"{r['threads']} threads) | step {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} tok/s", flush=True)
            return
        args = [a for a in sys.argv[1:]
                if not a.startswith(("--vs_torch", "--novs_torch", "--rounds", "--json", "--generate"))]
        if _GENERATE.value:
            results = [side_by_side([sys.executable, __file__, *args, f"--generate={b}"], rounds=_ROUNDS.value,
                                    key="ms_per_step") for b in batches]
            _print_decode_side_by_side(results)
            return
        r = side_by_side([sys.executable, __file__, *args], rounds=_ROUNDS.value)
    except RuntimeError as e:
        sys.exit(f"benchmark: {e}")
    if _JSON.value:
        print(json.dumps(r))
        return
    lj, pt = r["rounds"]["lightjax"][0], r["rounds"]["torch"][0]
    rounds = len(r["rounds"]["torch"])
    print(f"{lj['model']}, batch {lj['global_batch_size']} x {lj['seq_len']}, {lj['dtype']}, {rounds} alternating "
          f"rounds of {_STEPS.value} steps (medians):")
    print(f"  {pt['framework']} {pt['hf_class']}: " + ", ".join(f"{x['step_ms']:.1f}" for x in r["rounds"]["torch"])
          + f" ms -> {r['torch_step_ms']:.1f} ms/step")
    print(f"  lightjax ({lj['devices']} {lj['device_kind']} device(s)): "
          + ", ".join(f"{x['step_ms']:.1f}" for x in r["rounds"]["lightjax"])
          + f" ms -> {r['lightjax_step_ms']:.1f} ms/step")
    print(f"  lightjax speed: {r['speedup']:.2f}x PyTorch's", flush=True)


def _print_decode_side_by_side(results) -> None:
    if _JSON.value:
        for r in results:
            print(json.dumps(r))
        return
    lj, pt = results[0]["rounds"]["lightjax"][0], results[0]["rounds"]["torch"][0]
    print(f"{lj['model']} greedy decoding, {lj['new_tokens']} new tokens after {lj['prompt_len']}-token prompts, "
          f"{len(results[0]['rounds']['torch'])} alternating rounds (medians); {pt['framework']} "
          f"{pt['hf_class']}.generate ({pt['attention']} attention, {pt['threads']} threads):")
    for r in results:
        batch = r["rounds"]["lightjax"][0]["batch"]
        pt_ms, lj_ms = r["torch_step_ms"], r["lightjax_step_ms"]
        print(f"  batch {batch:3d}: torch {pt_ms:.2f} ms per step ({1e3 * batch / pt_ms:,.0f} tok/s), lightjax "
              f"{lj_ms:.2f} ms per step ({1e3 * batch / lj_ms:,.0f} tok/s): lightjax speed {r['speedup']:.2f}x")
    by_batch = {r["rounds"]["lightjax"][0]["batch"]: r for r in results}
    for batch, r in by_batch.items():
        if batch > 1 and 1 in by_batch:
            lj, pt = (r[k] / by_batch[1][k] for k in ("lightjax_step_ms", "torch_step_ms"))
            print(f"  a step at batch {batch} costs {lj:.2f}x one at batch 1 in lightjax ({pt:.2f}x in torch)")
    sys.stdout.flush()


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "benchmark")

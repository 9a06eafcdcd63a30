"""Serve a model over HTTP with the OpenAI API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`), continuous batching over `--slots` cache rows:

    pip install -e ".[serve]"
    python scripts/serve.py --workdir runs/lora --port 8000
    python scripts/serve.py --hf_dir checkpoints/Qwen/Qwen2.5-0.5B-Instruct --slots 16 --tensor 2
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

It compiles every program it needs before it listens (one per prompt width and the decode step), so no
request waits for a compilation. Ctrl-C stops it.
"""

import sys

from absl import flags

from lightjax.runtime.cli import define_step_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint, or --step).")
_STEP = define_step_flag()
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face checkpoint directory instead of --workdir.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export directory instead of --workdir.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together (cache rows).", lower_bound=1)
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Tokens per request, prompt and completion (0: the model's "
                                "block_size).", lower_bound=0)
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; beyond, 429.", lower_bound=0)
_POLICY = flags.DEFINE_enum("policy", "continuous", ["continuous", "static"], "continuous: a request joins as "
                            "soon as a slot is free; static: a new batch starts when the last one has finished.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Devices the model is split over (attention heads, MLP).", lower_bound=1)
_DATA = flags.DEFINE_integer("data", 1, "Devices the slots are split over.", lower_bound=1)
_NAME = flags.DEFINE_string("model_name", None, "The model's name in the API (default: the folder's name).")


def main(argv):
    del argv
    try:
        import uvicorn

        from lightjax.serve.api import create_app
        from lightjax.serve.server import build_engine
    except ModuleNotFoundError as e:
        from lightjax.runtime.packages import missing_package_message

        sys.exit(f"serve: {missing_package_message(e)}")
    from lightjax.train.checkpoint import CheckpointError

    try:
        engine, name, chat, why = build_engine(_WORKDIR.value, _STEP.value, _HF_DIR.value, _EXPORT_DIR.value,
                                               slots=_SLOTS.value, max_len=_MAX_LEN.value or None,
                                               max_queue=_MAX_QUEUE.value, policy=_POLICY.value, data=_DATA.value,
                                               tensor=_TENSOR.value, name=_NAME.value)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        sys.exit(f"serve: {e}")
    print(f"serve: {name}: {engine.slots} slots of {engine.max_len} tokens; compiling {len(engine.widths)} prompt "
          "widths and the decode step...", flush=True)
    engine.warm_up()
    engine.start()
    print(f"serve: listening on http://{_HOST.value}:{_PORT.value}/v1 (chat: {'yes' if chat else why})", flush=True)
    try:
        uvicorn.run(create_app(engine, name, chat, why), host=_HOST.value, port=_PORT.value, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "serve")

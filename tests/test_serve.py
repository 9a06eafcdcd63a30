"""The OpenAI-compatible server (scripts/serve.py, lightjax/serve/): the real `openai` client against the server
in a subprocess (completions, chat, streaming, stop strings, n > 1, errors, a client killed mid-stream), and
continuous batching in process: every request's greedy tokens equal generate()'s for its prompt alone,
whatever else shares the slots, with no compilation after warm-up, on one device and on a tensor-parallel mesh."""

import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np
import pytest

from lightjax.data.examples import prompt_ids
from lightjax.data.prompts import PromptStyle
from lightjax.data.tokenizers import ByteTokenizer
from lightjax.model.generate import generate
from lightjax.model.gpt import GPT
from lightjax.serve.engine import Engine, QueueFull, Request
from tests.helpers import ROOT, script_env, tiny_config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, the Hugging Face folder served): a random Llama with a word-level tokenizer and a chat
    template, served with 4 slots."""
    from tests.test_exports import _hf_base

    folder = _hf_base(tmp_path_factory.mktemp("serve") / "base", "llama")
    config = json.loads((folder / "config.json").read_text())  # room for a long stream (RoPE has no table)
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", f"--hf_dir={folder}", f"--port={port}", "--slots=4",
                             "--max_queue=8", "--max_len=1024"], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    while not any("listening" in line for line in lines):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(lines)
        lines.append(line)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    yield f"http://127.0.0.1:{port}/v1", folder
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def _client(url):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


@functools.cache
def _loaded(folder):
    from lightjax.convert.hf import load_hf_checkpoint
    from lightjax.data.tokenizers import load_hf_tokenizer

    cfg, params = load_hf_checkpoint(folder)
    return GPT(cfg), params, load_hf_tokenizer(folder)


def _greedy(folder, ids, max_new):
    """generate()'s greedy text for prompt ids alone, special tokens left out."""
    model, params, tokenizer = _loaded(folder)
    (tokens,) = generate(model, params, [ids], max_new, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


def test_the_openai_client_completes_chats_streams_and_stops(server):
    from lightjax.data.tokenizers import load_hf_tokenizer

    url, folder = server
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["base"]
    tokenizer = load_hf_tokenizer(folder)
    prompt = "is it a big cat ?"
    ids = tokenizer.encode_with_special_tokens(prompt).tolist()
    want, tokens = _greedy(folder, ids, 12)
    out = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(tokens))

    stream = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    assert "".join(p for p, _ in pieces) == want and len(pieces) > 2 and pieces[-1][1] == "length"

    stop = want.split()[3]  # a word of the greedy text: the completion ends before its first occurrence
    out = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == want[: want.index(stop)] and out.choices[0].finish_reason == "stop"

    messages = [{"role": "system", "content": "answer briefly ."}, {"role": "user", "content": prompt}]
    text = PromptStyle("chat", f"hf:{folder}").render(messages, add_generation_prompt=True)
    want_chat, _ = _greedy(folder, prompt_ids(text, tokenizer).tolist(), 10)
    chat = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == want_chat and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices

    several = client.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=5)
    again = client.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2] and len({c.text for c in several.choices}) > 1
    assert [c.text for c in several.choices] == [c.text for c in again.choices]  # the seed decides


def test_sixteen_concurrent_clients_each_get_their_prompts_greedy_answer(server):
    """16 clients at once, prompts of 1-12 words and 4-24 new tokens, through the server's 4 slots: each
    answer is generate()'s for its prompt alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_exports import WORDS

    url, folder = server
    rng = np.random.default_rng(1)
    asks = [(" ".join(rng.choice(WORDS, int(n))), int(m)) for n, m in zip(rng.integers(1, 13, 16),
                                                                        rng.integers(4, 25, 16), strict=True)]
    client = _client(url)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda a: client.completions.create(model="base", prompt=a[0], max_tokens=a[1],
                                                                    temperature=0).choices[0].text, asks))
    tokenizer = _loaded(folder)[2]
    for (prompt, n), answer in zip(asks, answers, strict=True):
        assert answer == _greedy(folder, tokenizer.encode_with_special_tokens(prompt).tolist(), n)[0], prompt


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    import openai

    url, _ = server
    client = _client(url)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens") as e:
        client.completions.create(model="base", prompt="is it a cat ? " * 300, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="is it", max_tokens=4)
    for bad, what in [({"temperature": 3}, "'temperature'=3 is not in"), ({"top_p": -1}, "'top_p'=-1 is not in"),
                      ({"max_tokens": 0}, "'max_tokens'=0 is not in"), ({"n": 9}, "'n'=9 is not in")]:
        with pytest.raises(openai.BadRequestError, match=what):
            client.completions.create(model="base", prompt="is it", **bad)
    request = urllib.request.Request(f"{url}/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    assert client.completions.create(model="base", prompt="is it", max_tokens=2).choices[0].text is not None


def test_a_client_killed_mid_stream_frees_its_slot(server):
    """A client asking for 1,000 tokens is killed after its first chunk: its slot is free again long before
    the request could have finished (the engine's steps since the kill are counted), and serving goes on."""
    url, _ = server
    health = url.removesuffix("/v1") + "/health"
    status = lambda: json.loads(urllib.request.urlopen(health).read())  # noqa: E731
    script = (f"import openai; c = openai.OpenAI(base_url={url!r}, api_key='x')\n"
              "for chunk in c.completions.create(model='base', prompt='is it', max_tokens=1000, stream=True, "
              "extra_body={'ignore_eos': True}):\n    print(chunk.choices[0].text, flush=True)\n")
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline()  # streaming has begun
    at_kill = status()
    assert at_kill["active"] == 1
    client.kill()  # kill -9: the connection drops mid-stream
    client.wait()
    deadline = time.time() + 60  # the request alone would end well within it; a leaked row would not
    while status()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert status()["steps"] - at_kill["steps"] < 500, (at_kill, status())
    assert _client(url).completions.create(model="base", prompt="is it", max_tokens=3).choices[0].text is not None


def _tiny_model(**kw):
    cfg = tiny_config("llama", vocab_size=257, block_size=128, **kw)
    model = GPT(cfg)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])


def _serve_all(engine, prompts, max_tokens):
    """Every prompt's tokens and finish reason, all submitted at once to the started engine."""
    done, finished = {}, threading.Event()

    def emit_for(i):
        def emit(event):
            if event.finish:
                done[i] = (list(event.tokens), event.finish)
                if len(done) == len(prompts):
                    finished.set()
        return emit

    for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.submit(Request(p, n, emit_for(i)))
    assert finished.wait(120)
    return [done[i] for i in range(len(prompts))]


def _check_batch_composition(model, params, engine, count=16):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 256, int(n)).tolist() for n in rng.integers(1, 33, count)]
    max_tokens = [int(m) for m in rng.integers(1, 25, count)]
    compiled = engine.compiled()
    engine.start()
    try:
        served = _serve_all(engine, prompts, max_tokens)
    finally:
        engine.stop()
    assert engine.compiled() == compiled == len(engine.widths) + 1  # nothing compiled while serving
    tokenizer = ByteTokenizer()
    for p, n, (tokens, _) in zip(prompts, max_tokens, served, strict=True):
        assert tokens == generate(model, params, [p], n, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size)[0]


def test_sixteen_concurrent_greedy_requests_each_equal_its_prompt_alone():
    """16 requests of 1-32 prompt tokens and 1-24 new ones through 4 slots (each slot reused by requests
    of other lengths): every request's tokens are generate()'s for its prompt alone, and serving compiled
    nothing after warm-up."""
    model, params = _tiny_model()
    engine = Engine(model, params, ByteTokenizer(), slots=4, max_len=96)
    engine.warm_up()
    _check_batch_composition(model, params, engine)


def test_a_tensor_parallel_mesh_serves_the_same_tokens():
    from lightjax.runtime.sharding import RULE_SETS, make_mesh
    from lightjax.serve.server import place_params

    model, params = _tiny_model(n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    placed = place_params(model, params, mesh, RULE_SETS["default"])
    head = placed["lm_head"]["kernel"]
    assert head.sharding.shard_shape(head.shape) == (head.shape[0], head.shape[1] // 2)  # split over tensor
    engine = Engine(model, placed, ByteTokenizer(), slots=4, max_len=96, mesh=mesh, rules=RULE_SETS["default"])
    engine.warm_up()
    _check_batch_composition(model, params, engine, count=8)


def test_a_full_queue_is_refused_not_waited_on():
    model, params = _tiny_model()
    engine = Engine(model, params, ByteTokenizer(), slots=1, max_len=96, max_queue=2)  # not started: none leave
    for _ in range(2):
        engine.submit(Request([1, 2, 3], 4, lambda e: None))
    with pytest.raises(QueueFull, match="2 requests are waiting already"):
        engine.submit(Request([1, 2, 3], 4, lambda e: None))
    with pytest.raises(ValueError, match="more than the 96 tokens"):
        engine.submit(Request([1] * 90, 7, lambda e: None))

    import asyncio

    from lightjax.serve.api import Api, BadRequest

    api = Api(engine, "tiny", None, "no template")

    async def third():
        return api.submit([1, 2, 3], api.settings({"prompt": "abc", "max_tokens": 4}))

    with pytest.raises(BadRequest, match="The server is busy: 2 requests are waiting already") as e:
        asyncio.run(third())
    assert (e.value.status, e.value.kind) == (429, "rate_limit_error")

"""Generation with the KV cache: exactness against recomputation and against Hugging Face, sampling
filters, compilation count, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightjax.convert.hf import config_from_hf, params_from_hf
from lightjax.model.generate import (
    attended_lengths,
    compiled_programs,
    decode_inputs,
    decode_loop,
    generate,
    top_k_filter,
    top_p_filter,
)
from lightjax.model.gpt import GPT, abstract_params, stack_layers
from lightjax.runtime.hlo import loop_copies, op_names
from lightjax.runtime.sharding import RULE_SETS, logical_to_sharding, make_mesh
from tests.helpers import VOCAB, random_hf_model, require_hf, tiny_config, tiny_preset

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]  # different lengths in one batch


def _model(family, seed=1, **overrides):
    cfg = tiny_config(family, **overrides)
    model = GPT(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    # Larger weights give peaked next-token distributions, so greedy choices are far from ties.
    return model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)


def _greedy_without_cache(model, params, prompt, n):
    """The reference: recompute the whole prefix for every new token. The prefix sits at the start of
    a block_size buffer (causal attention: what follows it cannot change its logits), so that one
    compiled forward pass serves every length."""
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, model.config.block_size), np.int32)
        buffer[0, : len(tokens)] = tokens
        logits = forward(buffer)[0, len(tokens) - 1, : model.config.vocab_size]
        tokens.append(int(jnp.argmax(logits)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("family", ["pythia", "llama"])
def test_cached_greedy_equals_recomputing_the_prefix(family):
    model, params = _model(family)
    want = [_greedy_without_cache(model, params, p, 12) for p in PROMPTS]
    assert generate(model, params, PROMPTS, 12) == want
    scanned = GPT(model.config, scan_layers=True)
    assert generate(scanned, stack_layers(params, model.config.n_layer), PROMPTS, 12) == want
    assert [generate(model, params, [p], 12)[0] for p in PROMPTS] == want  # batching changes nothing


def test_cached_greedy_with_sliding_windows_softcaps_and_local_rope():
    """Gemma-3-like layers (a 4-key window on layer 0 only, local RoPE there, q/k norms) plus soft-capping:
    the cache's window mask, in both layouts (the scanned one gets each layer's window as data)."""
    cfg = tiny_preset("gemma-3-1b-it", attention_logit_softcapping=2.0, final_logit_softcapping=5.0)
    model = GPT(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
    want = [_greedy_without_cache(model, params, p, 12) for p in PROMPTS]
    assert generate(model, params, PROMPTS, 12) == want
    scanned = GPT(cfg, scan_layers=True)
    assert generate(scanned, stack_layers(params, cfg.n_layer), PROMPTS, 12) == want


def test_generation_on_a_2x2x2_mesh_matches_one_device():
    model, params = _model("llama")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    rules = RULE_SETS["default"]
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    sharded = jax.device_put(params, logical_to_sharding(boxed, mesh, rules))
    prompts = PROMPTS + [[3, 3], [9]] * 2 + [[2, 4, 6]]  # 8 rows: the batch splits over data x fsdp
    assert generate(model, sharded, prompts, 10, mesh=mesh, rules=rules) == generate(model, params, prompts, 10)


@pytest.mark.parametrize("family,config_cls,model_cls,extra", [
    ("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25)),
    ("llama-gqa", "LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
])
def test_greedy_generation_equals_transformers(family, config_cls, model_cls, extra):
    torch, _ = require_hf()
    hf_model = random_hf_model((torch, __import__("transformers")), config_cls, model_cls, **extra)
    hf_model.generation_config.eos_token_id = None  # generate all the tokens on both sides
    cfg = config_from_hf(hf_model.config.to_dict())
    params = params_from_hf({k: v.detach().numpy() for k, v in hf_model.state_dict().items()}, cfg)
    prompt = np.random.default_rng(0).integers(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, pad_token_id=0)
    want = want[0, prompt.shape[1]:].tolist()
    assert len(want) == 20
    assert generate(GPT(cfg), params, prompt.tolist(), 20) == [want]


def test_top_k_1_is_greedy_and_a_seed_reproduces_samples():
    model, params = _model("pythia")
    greedy = generate(model, params, PROMPTS, 10)
    assert generate(model, params, PROMPTS, 10, temperature=1.5, top_k=1, seed=3) == greedy
    a = generate(model, params, PROMPTS, 10, temperature=1.0, seed=7)
    assert generate(model, params, PROMPTS, 10, temperature=1.0, seed=7) == a
    assert generate(model, params, PROMPTS, 10, temperature=1.0, seed=8) != a
    assert all(0 <= t < model.config.vocab_size for row in a for t in row)  # never a padding-vocab row


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.05, 0.5, 0.1, 0.2, 0.15]])
    logits = jnp.log(probs)
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)))[0]))  # noqa: E731
    assert kept(0.3) == {1}  # 0.5 alone reaches 0.3
    assert kept(0.5) == {1}  # exactly p
    assert kept(0.6) == {1, 3}  # 0.5 + 0.2
    assert kept(0.8) == {1, 3, 4}  # 0.85
    assert kept(0.9) == {1, 3, 4, 2}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert kept(0.0) == kept(1e-9) == {1}  # the likeliest token always stays
    kept_k = lambda k: set(np.flatnonzero(np.isfinite(np.asarray(top_k_filter(logits, k)))[0]))  # noqa: E731
    assert kept_k(1) == {1} and kept_k(2) == {1, 3} and kept_k(0) == kept_k(9) == {0, 1, 2, 3, 4}


def test_sampling_draws_follow_the_filtered_distribution():
    model, params = _model("pythia", seed=2)
    draws = [generate(model, params, [[1, 2]], 1, temperature=1.0, top_p=0.5, seed=s)[0][0] for s in range(30)]
    logits = model.apply({"params": params}, jnp.array([[1, 2]]))[0, -1, : model.config.vocab_size]
    allowed = set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits[None], 0.5)))[0]))
    assert set(draws) <= allowed


def test_decode_loop_compiles_once_per_batch_and_length_bucket():
    model, params = _model("llama", seed=3, n_embd=48)  # a shape no other test compiles: order-independent
    first = compiled_programs()
    generate(model, params, [[1, 2, 3], [4, 5]], 5)
    before = compiled_programs()
    assert before == first + 1
    generate(model, params, [[7], [8, 9, 10, 11]], 3, temperature=0.7, top_k=5, top_p=0.9)  # same buckets
    generate(model, params, [[1, 2, 3, 4, 5], [6]], 6, eos_id=3, seed=4)
    assert compiled_programs() == before
    generate(model, params, [[1, 2, 3]] * 5, 5)  # another batch size: one more program
    assert compiled_programs() == before + 1


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_decode_loop_writes_the_cache_in_place(scan):
    """The compiled decode steps copy no cache buffer: each layer writes its new slots in place and
    its attention reads the cache's chunks where they lie (a scanned stack reads its layer's keys and
    values out of each stacked chunk: such slices only)."""
    cfg = tiny_config("llama", block_size=256, n_embd=64, n_layer=3)
    B, G, h = 3, cfg.n_query_groups, cfg.head_size
    args, cache_len = decode_inputs(cfg, [[1, 2, 3]] * B, 200)
    assert attended_lengths(16, cache_len) == [32, 64, 128, 256]  # chunks of 32, 32, 64 and 128 slots
    params = nn.unbox(abstract_params(cfg, scan_layers=scan))
    compiled = decode_loop().lower(GPT(cfg, scan_layers=scan), params, *args, cache_len=cache_len).compile()
    layer_chunks = {f"f32[{B},{G},{n},{h}]" for n in (32, 64, 128)}
    chunks = layer_chunks | {f"f32[{cfg.n_layer},{B},{G},{n},{h}]" for n in (32, 64, 128)}
    text = compiled.as_text()
    in_decode_step = {name for name, scope in op_names(text).items() if scope.startswith("jit(_decode_loop)/while/")}
    copies = [(name, shape.split("{")[0]) for name, _, shape in loop_copies(text, B * G * 32 * h)
              if shape.split("{")[0] in chunks and name in in_decode_step]
    if not scan:
        assert copies == []
    else:
        assert copies and {shape for _, shape in copies} <= layer_chunks  # layer reads, never a stacked chunk
        assert all(name.startswith("dynamic-slice") for name, _ in copies), copies


def test_text_generation_cuts_at_the_first_stop_string():
    import string

    from lightjax.data.tokenizers import CharTokenizer
    from lightjax.model.generate import cut_at_stop, generate_text

    assert cut_at_stop("abc\n\nHAMLET: x", ["HAMLET:", "\n\n"]) == "abc"
    assert cut_at_stop("no stop here", ["zz", ""]) == "no stop here"
    model, params = _model("pythia")
    tokenizer = CharTokenizer(string.printable[:VOCAB])
    full = generate_text(model, params, tokenizer, ["abc", "xy"], 12)
    assert [len(text) for text in full] == [12, 12]
    assert full[0] == tokenizer.decode(generate(model, params, [tokenizer.encode("abc").tolist()], 12)[0])
    stop = full[0][5:7]
    cut = generate_text(model, params, tokenizer, ["abc", "xy"], 12, stop=[stop])
    assert cut == [full[0][:full[0].find(stop)], cut_at_stop(full[1], [stop])] and stop not in cut[0]


def test_stops_at_eos_and_bounds_max_new_tokens():
    model, params = _model("pythia")
    full = generate(model, params, [PROMPTS[1]], 12)[0]
    eos = full[4]
    assert eos not in full[:4]
    assert generate(model, params, [PROMPTS[1]], 12, eos_id=eos)[0] == full[:4]
    with pytest.raises(ValueError, match=r"max_new_tokens=26 is not in \[1, 25\].*7 tokens.*block_size is 32"):
        generate(model, params, PROMPTS, 26)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[]], 3)
    for bad, message in [(dict(top_p=0.0), r"top_p=0.0 is not in \(0, 1\]"), (dict(top_p=1.5), "top_p=1.5"),
                         (dict(temperature=float("nan")), "temperature=nan is not a finite number"),
                         (dict(temperature=-1.0), "temperature=-1.0"), (dict(top_k=-2), "top_k=-2 is negative")]:
        with pytest.raises(ValueError, match=message):
            generate(model, params, [PROMPTS[1]], 3, **bad)

"""Hostile and careless inputs: each is one clear error naming the file and what is wrong, never
another exception and never an allocation the file's size does not justify."""

import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from lightjax.convert.hf import read_hf_config, read_hf_state_dict
from lightjax.convert.hf_config import config_from_hf
from lightjax.convert.safetensors_io import read_safetensors, write_safetensors


@pytest.fixture
def valid_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3),
               "c": rng.normal(size=(16,)).astype(ml_dtypes.bfloat16)}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors)
    return path, tensors


def test_safetensors_round_trip(valid_file):
    path, tensors = valid_file
    got = read_safetensors(path)
    assert got.keys() == tensors.keys()
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(path, header, body, length=None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + body)


def _edits(header):
    """Header edits a careless or hostile writer makes."""
    yield [1, 2]
    yield {**header, "a": {**header["a"], "dtype": 7}}
    yield {**header, "a": {**header["a"], "dtype": "F128"}}
    yield {**header, "a": {k: v for k, v in header["a"].items() if k != "data_offsets"}}
    yield {**header, "a": {**header["a"], "data_offsets": [0, 10**15]}}
    yield {**header, "a": {**header["a"], "data_offsets": [-8, 8]}}
    yield {**header, "a": {**header["a"], "shape": [10**9, 10**9]}}
    yield {**header, "a": {**header["a"], "shape": [-1, 32]}}
    yield {**header, "b": {**header["b"], "data_offsets": header["a"]["data_offsets"]}}  # overlapping
    yield {**header, "a": "not an object"}


def _mutations(path, rng):
    """300 damaged copies of a valid file's bytes."""
    data = path.read_bytes()
    header, body = _header(path)
    fixed = [b"", data[:4], struct.pack("<Q", 2**63) + data[8:], struct.pack("<Q", len(data)) + data[8:]]
    for edit in _edits(header):
        encoded = json.dumps(edit).encode()
        fixed.append(struct.pack("<Q", len(encoded)) + encoded + body)
    yield from fixed
    for i in range(300 - len(fixed)):
        copy = bytearray(data)
        kind = i % 3
        if kind == 0:  # bytes flipped anywhere
            for at in rng.integers(0, len(copy), size=int(rng.integers(1, 9))):
                copy[at] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncated
            copy = copy[:int(rng.integers(0, len(copy)))]
        else:  # a header byte replaced by printable junk
            copy[int(rng.integers(8, 8 + len(json.dumps(header))))] = int(rng.integers(32, 127))
        yield bytes(copy)


def test_safetensors_fuzz(valid_file, tmp_path):
    path, _ = valid_file
    rng = np.random.default_rng(1234)
    victim = tmp_path / "damaged.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for i, data in enumerate(_mutations(path, rng)):
        victim.write_bytes(data)
        tracemalloc.start()
        try:
            tensors = read_safetensors(victim)
            assert all(t.nbytes <= len(data) for t in tensors.values())
            outcomes["read"] += 1
        except ValueError as e:
            message = str(e)
            assert str(victim) in message and "\n" not in message, (i, message)
            outcomes["refused"] += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= 4 * len(data) + 2**20, (i, peak)  # nothing sized by a header's claims
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 100, outcomes


def test_an_index_naming_a_file_outside_the_directory_is_refused(valid_file, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(ValueError, match=r"shard '../model.safetensors' is not a file inside"):
        read_hf_state_dict(model)
    (model / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"not a safetensors index"):
        read_hf_state_dict(model)


LLAMA = {"model_type": "llama", "vocab_size": 96, "num_hidden_layers": 2, "hidden_size": 32,
         "num_attention_heads": 4, "intermediate_size": 64}


@pytest.mark.parametrize("edit,message", [
    ({"hidden_size": None}, "'hidden_size' is missing (a positive integer)"),
    ({"vocab_size": None, "num_hidden_layers": None}, "'vocab_size' is missing (a positive integer); "
                                                      "'num_hidden_layers' is missing"),
    ({"hidden_size": "32"}, "'hidden_size' is '32', not a positive integer"),
    ({"intermediate_size": 6.5}, "'intermediate_size' is 6.5, not a positive integer"),
    ({"rope_theta": "big"}, "'rope_theta' is 'big', not a number"),
])
def test_hf_config_names_missing_and_mistyped_keys(edit, message):
    hf = {k: v for k, v in {**LLAMA, **edit}.items() if v is not None}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(hf)
    assert config_from_hf(LLAMA).n_embd == 32


def test_hf_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"config.json is not a JSON object"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        read_hf_config(tmp_path)

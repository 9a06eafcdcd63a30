"""Instruction records for fine-tuning, read and checked: a source is `json:PATH` or `jsonl:PATH`, a file
(its last `data.val_fraction` of records validate) or a folder holding `train.json[l]` and
`validation.json[l]`. A record is either

    {"instruction": ..., "input": ... (optional), "output": ...}            (Alpaca, LitGPT's JSON data)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (chat; the last
                                                                               assistant turn is the response)

Every record keeps where it came from (file and line), so that a bad one is named in one line.
prompts.py renders a record as prompt and response text; examples.py tokenizes them into rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SOURCE_PREFIXES = ("json:", "jsonl:")


def is_instruction_source(source: str) -> bool:
    return source.startswith(SOURCE_PREFIXES)


class Record(dict):
    """One training record, with where it came from (for error messages)."""

    where: str = ""


def _read_file(path: Path, kind: str) -> list[Record]:
    """The records of a `kind` ('jsonl': one per non-blank line; 'json': a list of them) file: the
    source's prefix decides, whatever the file is named."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); save it as UTF-8."
                         ) from None
    if kind == "jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path}:{n}", json.loads(line)))
                except ValueError:
                    raise ValueError(f"{path}:{n} is not valid JSON (a jsonl: source has one record per line)."
                                     ) from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}; a json: source is one list of records, jsonl: one "
                             "record per line).") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records (it holds a {type(data).__name__}).")
        items = [(f"{path} record {n}", r) for n, r in enumerate(data, 1)]
    records = []
    for where, item in items:
        if not isinstance(item, dict):
            raise ValueError(f"{where} is a {type(item).__name__}, not a record (a JSON object).")
        record = Record(item)
        record.where = where
        records.append(record)
    return records


def load_records(source: str, split: str, val_fraction: float) -> list[Record]:
    """The records of `split` ('train' or 'validation') of a json:/jsonl: source."""
    if split not in ("train", "validation"):
        raise ValueError(f"config.data.source={source!r} has no {split!r} split (its splits: train, validation).")
    path = Path(source.split(":", 1)[1])
    kind = source.split(":", 1)[0]
    if path.is_dir():
        files = [path / f"{split}.{kind}"]
        if not files[0].is_file():
            raise FileNotFoundError(f"config.data.source={source!r}: no {files[0].name} in {path} (a folder "
                                    f"source holds train.{kind} and validation.{kind}).")
        return _read_file(files[0], kind)
    if not path.is_file():
        raise FileNotFoundError(f"config.data.source={source!r}: {path} does not exist.")
    records = _read_file(path, kind)
    n_val = max(1, round(len(records) * val_fraction))
    if len(records) <= n_val:
        raise ValueError(f"config.data.source={source!r} has {len(records)} record(s): too few to hold back "
                         f"{n_val} for validation (data.val_fraction={val_fraction}).")
    return records[:-n_val] if split == "train" else records[-n_val:]


def as_messages(record: Record) -> list[dict[str, str]]:
    """A record as chat messages (text contents) ending with the assistant's response; a ValueError naming
    the record and the field when it has neither form, a field of the wrong type, or an empty response."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{record.where}: 'messages' must be a non-empty list of {{role, content}}.")
        messages = [_message(record, i, m) for i, m in enumerate(messages)]
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{record.where}: the last message must be the assistant's response (it is the "
                             f"{messages[-1]['role']}'s).")
    elif "instruction" in record and "output" in record:
        instruction, output = _text(record, "instruction"), _text(record, "output")
        input_text = _text(record, "input", optional=True)
        user = instruction + (f"\n\n{input_text}" if input_text else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(f"{record.where}: a record needs 'instruction' and 'output' (and optionally 'input'), or "
                         f"'messages'; it has {sorted(record)}.")
    if not messages[-1]["content"].strip():
        raise ValueError(f"{record.where}: the response is empty; every record needs a response to learn.")
    return messages


def _text(record: Record, field: str, optional: bool = False) -> str:
    value = record.get(field)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{record.where}: {field!r} is {_json_type(value)}; it must be a string.")
    return value


def _message(record: Record, i: int, message: Any) -> dict[str, str]:
    """Message i as {role, content} with text content: a string, or a list of parts as OpenAI-style exports
    write them ([{"type": "text", "text": ...}, ...]), whose text parts are joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
        raise ValueError(f"{record.where}: messages[{i}] must be an object with a string 'role' and a 'content'.")
    content = message["content"]
    if isinstance(content, list):
        kinds = {part.get("type") if isinstance(part, dict) else _json_type(part) for part in content}
        if not kinds <= {"text"} or not all(isinstance(part.get("text"), str) for part in content):
            raise ValueError(f"{record.where}: messages[{i}].content is a list of parts of kinds "
                             f"{sorted(map(str, kinds))}; only text parts ({{'type': 'text', 'text': ...}}) can be "
                             "trained on.")
        content = "".join(part["text"] for part in content)
    elif not isinstance(content, str):
        raise ValueError(f"{record.where}: messages[{i}].content is {_json_type(content)}; it must be a string or a "
                         "list of text parts.")
    return {"role": message["role"], "content": content}


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)

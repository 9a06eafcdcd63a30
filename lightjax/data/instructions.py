"""Instruction data for fine-tuning: records -> prompt and response -> token rows whose loss mask covers
the response only (as LitGPT's SFT datasets, with its default of masking the prompt).

A source is `json:PATH` or `jsonl:PATH`: a file (its last `data.val_fraction` of records validate)
or a folder holding `train.json[l]` and `validation.json[l]`. A record is either

    {"instruction": ..., "input": ... (optional), "output": ...}            (Alpaca, LitGPT's JSON data)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (chat; the last
                                                                               assistant turn is the response)

`data.prompt_style` renders the prompt: 'alpaca' (the Stanford Alpaca template) or 'chat' (the chat
template of the `hf:DIR` tokenizer's tokenizer_config.json, rendered as `transformers` does).

Prepared once (process 0, before the first step) into WORKDIR/data/SPLIT.examples.npz: every
example's tokens (prompt, response, EOS) and its prompt length. `ExampleRows` cuts them into rows of
seq_len + 1 tokens with a mask [seq_len] that is 1 where the target is a response token: one example
per row, padded (`data.pack=False`), or consecutive examples packed into each row (`data.pack=True`;
an example then attends to the ones before it in its row, as in TRL's packing).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.sandbox
import numpy as np
from etils import epath

if TYPE_CHECKING:  # tokenizers.py imports sources.py, which reads these records
    from lightjax.data.tokenizers import Tokenizer

PROMPT_STYLES = ("alpaca", "chat")
SOURCE_PREFIXES = ("json:", "jsonl:")

_ALPACA = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


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


class PromptStyle:
    """Renders a record as (prompt, response) text."""

    def __init__(self, style: str, tokenizer_spec: str = ""):
        if style not in PROMPT_STYLES:
            raise ValueError(f"config.data.prompt_style={style!r} is not one of {', '.join(PROMPT_STYLES)}.")
        self.style, self._template, self._special = style, None, {}
        if style == "chat":
            self._template, self._special = _chat_template(tokenizer_spec)

    def __call__(self, record: Record) -> tuple[str, str]:
        messages = as_messages(record)
        if self.style == "alpaca":
            return alpaca_prompt(record, messages), messages[-1]["content"]
        prompt = self._render(messages[:-1], add_generation_prompt=True, where=record.where)
        full = self._render(messages, add_generation_prompt=False, where=record.where)
        if not full.startswith(prompt):
            raise ValueError(f"{record.where}: the chat template renders the conversation without its prompt as a "
                             "prefix; the response cannot be told apart.")
        return prompt, full[len(prompt):]

    def prompt(self, instruction: str, input_text: str = "") -> str:
        """The prompt of a new instruction (generation)."""
        record = Record(instruction=instruction, input=input_text, output="-")
        return self(record)[0]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, where: str = "") -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except jinja2.TemplateError as e:
            raise ValueError(f"{where or 'a prompt'}: the chat_template in {self._template.source_file} failed: "
                             f"{type(e).__name__}: {e}.") from None


def alpaca_prompt(record: Record, messages: list[dict[str, str]]) -> str:
    if "instruction" in record:
        instruction, input_text = record["instruction"], record.get("input", "")
    else:
        instruction, input_text = "\n\n".join(m["content"] for m in messages[:-1]), ""
    return _ALPACA.format(context=", paired with an input that provides further context" if input_text else "",
                          instruction=instruction, input=f"### Input:\n{input_text}\n\n" if input_text else "")


def _chat_template(tokenizer_spec: str) -> tuple[jinja2.Template, dict[str, Any]]:
    """The chat template of an `hf:DIR` tokenizer, compiled as `transformers` compiles it."""
    if not tokenizer_spec.startswith("hf:"):
        raise ValueError(f"config.data.prompt_style='chat' needs the model's own tokenizer (data.tokenizer='hf:DIR'), "
                         f"not {tokenizer_spec!r}.")
    path = Path(tokenizer_spec[3:]) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"config.data.prompt_style='chat': {path} has no chat_template; use prompt_style='alpaca'.")

    def raise_exception(message: str) -> None:
        raise ValueError(f"The chat template refused a record: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"The chat_template in {path} does not parse (template line {e.lineno}: {e.message})."
                         ) from None
    compiled.source_file = str(path)
    return compiled, special


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def prompt_ids(prompt: str, tokenizer: Tokenizer) -> np.ndarray:
    """BOS + the prompt's ids: BOS where the tokenizer has one and the text does not already start with it."""
    head = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None and (not len(head) or head[0] != tokenizer.bos_id):
        head = np.concatenate([[tokenizer.bos_id], head])
    return head.astype(np.int32)


def encode_example(prompt: str, response: str, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(BOS + prompt + response + EOS ids, the number of prompt ids); EOS where the tokenizer has one
    and the response does not already end with it."""
    head = prompt_ids(prompt, tokenizer)
    tail = tokenizer.encode(response)
    if tokenizer.eos_id is not None and (not len(tail) or tail[-1] != tokenizer.eos_id):
        tail = np.concatenate([tail, [tokenizer.eos_id]])
    return np.concatenate([head, tail]).astype(np.int32), len(head)


def write_examples(records: Sequence[Record], style: PromptStyle, tokenizer: Tokenizer, path: str | epath.PathLike,
                   provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `records` into `path` (npz: `tokens`, every example's ids one after another, `starts`
    and `prompt_lens`) and its metadata `path`.json, written last. Returns the metadata."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.parent / (path.name + ".json")
    meta_path.unlink(missing_ok=True)
    ids, prompt_lens, chars, nbytes = [], [], 0, 0
    for record in records:
        prompt, response = style(record)
        example, n_prompt = encode_example(prompt, response, tokenizer)
        ids.append(example)
        prompt_lens.append(n_prompt)
        chars, nbytes = chars + len(response), nbytes + len(response.encode("utf-8"))
    starts = np.cumsum([0] + [len(x) for x in ids])
    with path.open("wb") as f:
        np.savez(f, tokens=np.concatenate(ids) if ids else np.zeros(0, np.int32), starts=starts,
                 prompt_lens=np.asarray(prompt_lens, np.int64))
    response_tokens = int(sum(len(x) - p for x, p in zip(ids, prompt_lens, strict=True)))
    # "tokens", "characters" and "bytes" are the responses': the loss counts response tokens only.
    meta = {"examples": len(ids), "tokens": response_tokens, "all_tokens": int(starts[-1]), "characters": chars,
            "bytes": nbytes, **(provenance or {})}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


class ExampleRows(Sequence):
    """Rows of seq_len + 1 tokens and their response masks, from a `write_examples` file: one example
    per row (truncated to fit) or, with `pack`, consecutive examples filling each row."""

    def __init__(self, path: str | epath.PathLike, seq_len: int, pack: bool = False):
        with epath.Path(path).open("rb") as f:
            data = np.load(f)
            self.tokens, starts, self.prompt_lens = data["tokens"], data["starts"], data["prompt_lens"]
        self.seq_len, self.starts, self.ends = seq_len, starts[:-1], starts[1:]
        if not len(self.starts):
            raise ValueError(f"{path} holds no examples.")
        lengths = self.ends - self.starts
        self.cut = int(np.sum(lengths > seq_len + 1))  # examples losing their end to the row length
        self.unlearnable = int(np.sum(self.prompt_lens >= seq_len + 1))  # ... and with it their whole response
        if self.unlearnable == len(lengths):
            raise ValueError(f"config.data.seq_len={seq_len} leaves no response token of any example in {path} "
                             f"(the shortest prompt has {int(self.prompt_lens.min())} tokens); raise data.seq_len.")
        self.rows = _pack(self.ends - self.starts, seq_len + 1) if pack else [[i] for i in range(len(self.starts))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        tokens, mask = np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len + 1, np.int32)
        at = 0
        for e in self.rows[i]:
            example = self.tokens[self.starts[e]: self.ends[e]][: self.seq_len + 1 - at]
            tokens[at: at + len(example)] = example
            mask[at + self.prompt_lens[e]: at + len(example)] = 1  # the response's tokens, as targets
            at += len(example)
        return {"tokens": tokens, "mask": mask[1:]}  # mask[j]: whether target j (token j + 1) counts

    def close(self) -> None:
        """Nothing to close: the examples are held in memory."""


def _pack(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Consecutive examples per row while they fit (an example longer than a row has one to itself)."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > row_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    rows.append(current)
    return rows


def example_batches(rows: ExampleRows, batch_size: int, shard: tuple[int, int],
                    max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over the rows in order, padded with fully masked rows, every
    process yielding the same number of batches (as pipeline.eval_batches)."""
    index, count = shard
    n_batches = -(-len(rows) // (batch_size * count))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        tokens = np.zeros((batch_size, rows.seq_len + 1), np.int32)
        mask = np.zeros((batch_size, rows.seq_len), np.int32)
        for r in range(batch_size):
            row = (b * count + index) * batch_size + r
            if row < len(rows):
                example = rows[row]
                tokens[r], mask[r] = example["tokens"], example["mask"]
        yield {"tokens": tokens, "mask": mask}

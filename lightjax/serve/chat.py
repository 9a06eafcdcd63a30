"""How a served model reads a conversation (`/v1/chat/completions`): a run fine-tuned on instruction data
renders it with its own `data.prompt_style`, as in training (the chat template of its hf: tokenizer, or
Alpaca's template); a Hugging Face folder or an export with a chat template renders it with that template.
A model without either (a run on plain text, a base model) has no chat format, and says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightjax.data.examples import prompt_ids
from lightjax.data.prompts import PromptStyle, alpaca_prompt
from lightjax.data.records import Record, is_instruction_source
from lightjax.train.load import LoadedModel

Chat = Callable[[list[dict[str, str]]], list[int]]


def chat_format(loaded: LoadedModel, folder: str | None) -> tuple[Chat | None, str]:
    """(messages -> prompt ids asking for the assistant's turn, or None; why there is none). `folder`: the
    Hugging Face or export folder's tokenizer directory (None for a run)."""
    if loaded.config is not None:
        data = loaded.config.data
        if not is_instruction_source(data.source):
            return None, f"the run trained on plain text (data.source={data.source!r}), not on instruction records."
        style = PromptStyle(data.get("prompt_style", "alpaca"), data.tokenizer)
    else:
        try:
            style = PromptStyle("chat", f"hf:{folder}")
        except ValueError:
            return None, f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)."
    return lambda messages: _render(style, messages, loaded.tokenizer), ""


def _render(style: PromptStyle, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    if style.style == "alpaca":
        text = alpaca_prompt(Record(messages=messages), [*messages, {"role": "assistant", "content": ""}])
    else:
        text = style.render(messages, add_generation_prompt=True, where="the request's messages")
    return prompt_ids(text, tokenizer).tolist()


def tokenizer_folder(hf_dir: str | None, export_dir: str | None) -> str | None:
    """Where a Hugging Face folder's or an export's tokenizer files are (a run's come from its config)."""
    if hf_dir:
        return hf_dir
    return str(Path(export_dir) / "tokenizer") if export_dir else None

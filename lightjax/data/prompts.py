"""Prompt styles: a record (records.py) rendered as (prompt, response) text.

- 'alpaca': the Stanford Alpaca template, as LitGPT's Alpaca style writes it.
- 'chat': the chat template of the `hf:DIR` tokenizer's tokenizer_config.json, rendered as
  `transformers`' `apply_chat_template` renders it: the same sandboxed Jinja environment, its `tojson`
  filter (no HTML escaping, its indent/separators/sort_keys options), its `{% generation %}` block,
  `raise_exception`, `strftime_now`, `dict` and `namespace`, and the tokenizer's special tokens as
  variables. The prompt is the conversation without its last (assistant) turn with the generation
  prompt added; the response is what the full conversation adds to it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from lightjax.data.records import Record, as_messages

PROMPT_STYLES = ("alpaca", "chat")

_ALPACA = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")



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
        prompt = self.render(messages[:-1], add_generation_prompt=True, where=record.where)
        full = self.render(messages, add_generation_prompt=False, where=record.where)
        if not full.startswith(prompt):
            raise ValueError(f"{record.where}: the chat template renders the conversation without its prompt as a "
                             "prefix; the response cannot be told apart.")
        return prompt, full[len(prompt):]

    def prompt(self, instruction: str, input_text: str = "") -> str:
        """The prompt of a new instruction (generation)."""
        record = Record(instruction=instruction, input=input_text, output="-")
        return self(record)[0]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, where: str = "") -> str:
        """The chat template's text of `messages` (chat style), as transformers' apply_chat_template renders
        it; a ValueError naming `where` (the record) and the template's file when the template fails."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as e:
            raise ValueError(f"{where or 'a prompt'}: the chat template in {self._template.source_file} failed: "
                             f"{type(e).__name__}: {e}.") from None


def alpaca_prompt(record: Record, messages: list[dict[str, str]]) -> str:
    if "instruction" in record:
        instruction, input_text = record["instruction"], record.get("input", "")
    else:
        instruction, input_text = "\n\n".join(m["content"] for m in messages[:-1]), ""
    return _ALPACA.format(context=", paired with an input that provides further context" if input_text else "",
                          instruction=instruction, input=f"### Input:\n{input_text}\n\n" if input_text else "")


# The special tokens transformers passes to a chat template (its tokenizer's special_tokens_map).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _chat_template(tokenizer_spec: str) -> tuple[jinja2.Template, dict[str, str]]:
    """(the chat template of an `hf:DIR` tokenizer, compiled as transformers compiles it; its special
    tokens). The template is DIR/chat_template.jinja where there is one (transformers 4.43+ saves it
    there), else tokenizer_config.json's `chat_template` (the default one of a list)."""
    if not tokenizer_spec.startswith("hf:"):
        raise ValueError(f"config.data.prompt_style='chat' needs the model's own tokenizer (data.tokenizer='hf:DIR'), "
                         f"not {tokenizer_spec!r}.")
    directory = Path(tokenizer_spec[3:])
    config = _read_json(directory / "tokenizer_config.json")
    path, template = directory / "chat_template.jinja", None
    if path.is_file():
        template = path.read_text(encoding="utf-8")
    else:
        path, template = directory / "tokenizer_config.json", config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"config.data.prompt_style='chat': {directory} has no chat_template (no chat_template.jinja, "
                         "none in tokenizer_config.json); use prompt_style='alpaca'.")
    tokens = {**_read_json(directory / "special_tokens_map.json"), **config}
    special = {k: _token_text(tokens[k]) for k in _SPECIAL_TOKENS if tokens.get(k) is not None}
    try:
        compiled = _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"The chat template in {path} does not parse (template line {e.lineno}: {e.message})."
                         ) from None
    compiled.source_file = str(path)
    return compiled, special


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else str(token)


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block, which marks the assistant's text for
    its assistant-token mask; rendered as its content (lightjax masks the response by its position)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

    def _content(self, caller: Any) -> str:
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: json.dumps with its options; Jinja's own escapes <, >, & and ' as HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(f"the template refused the conversation: {message}")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore-named attributes: templates from the Hub are untrusted code, and
    transformers refuses those too."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (its chat_template_utils)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs),
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env

"""Chat templates rendered as transformers renders them, compared with `tokenizer.apply_chat_template` on three
real templates: Qwen 3 (in tokenizer_config.json), Llama 3.2 and Gemma 3 (as chat_template.jinja, which takes
precedence), each with a system turn and several turns; Qwen 3 and Llama 3.2 also with a tool call, whose
arguments go through the templates' `tojson`."""

import json
import shutil

import pytest

from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record
from tests.helpers import ROOT, require_hf

TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
SYSTEM = {"role": "system", "content": "You answer in one line. Café prices in € only."}
TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And <b>2 & 3</b>, in words?"},
    {"role": "assistant", "content": "Five, as 'five'."},
]
CONVERSATIONS = {
    "a system turn and one exchange": [SYSTEM, *TURNS[:2]],
    "a system turn and two exchanges": [SYSTEM, *TURNS],
    "two exchanges, no system turn": TURNS,
}
TOOL_CALL = [
    {"role": "user", "content": "Find the café."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "café <near> & 'open'", "limit": 2}}}]},
    {"role": "tool", "content": "Café Zoë, 2 rue Émile"},
    {"role": "assistant", "content": "Café Zoë is open."},
]


def _tokenizer_dir(tmp_path, name):
    """The template's folder with a tokenizer beside it (tiny-llama-hf's), as a model directory holds them."""
    folder = tmp_path / name
    shutil.copytree(TEMPLATES / name, folder)
    shutil.copy(ROOT / "tests" / "data" / "tiny-llama-hf" / "tokenizer.json", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def _template(tmp_path, name):
    """(our PromptStyle, transformers' tokenizer) over the same model directory."""
    _, transformers = require_hf()
    folder = _tokenizer_dir(tmp_path, name)
    return PromptStyle("chat", f"hf:{folder}"), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", ["qwen3", "llama-3.2", "gemma-3"])
def test_a_conversation_renders_as_transformers_renders_it(tmp_path, name, conversation):
    style, tokenizer = _template(tmp_path, name)
    messages = CONVERSATIONS[conversation]
    if name == "gemma-3" and messages[0]["role"] == "system":
        assert "<start_of_turn>system" not in style.render(messages)  # Gemma 3 folds it into the first user turn
    for generation_prompt in (False, True):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert style.render(messages, generation_prompt) == want
    # A record's prompt is the conversation without its last turn, with the generation prompt; its response
    # is what the whole conversation adds.
    prompt, response = style(Record(messages=messages))
    assert prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt + response == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("name", ["qwen3", "llama-3.2"])  # Gemma 3's template has no tool turns
def test_tool_calls_render_through_the_templates_tojson(tmp_path, name):
    style, tokenizer = _template(tmp_path, name)
    want = tokenizer.apply_chat_template(TOOL_CALL, tokenize=False)
    assert style.render(TOOL_CALL) == want
    assert "café <near>" in want  # transformers' tojson: not HTML-escaped, not ASCII-escaped


def test_a_template_that_refuses_a_conversation_is_named(tmp_path):
    style, _ = _template(tmp_path, "gemma-3")  # it refuses turns that do not alternate
    record = Record(messages=[TURNS[0], TURNS[0], TURNS[1]])
    record.where = "data.jsonl:3"
    with pytest.raises(ValueError, match=r"data.jsonl:3: the chat template in .*chat_template.jinja failed: .*"
                                         r"Conversation roles must alternate"):
        style(record)

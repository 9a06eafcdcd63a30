"""lm-evaluation-harness tasks on a lightjax model: `HarnessModel` is an `lm_eval` model computed by the
project's own forward pass and cached generation (what `litgpt evaluate` does through transformers).

The harness turns each task's documents into requests of three kinds:
- loglikelihood(context, continuation): the continuation's log-probability after the context, and whether
  greedy decoding would produce it (multiple choice: ARC, HellaSwag, PIQA, MMLU; LAMBADA);
- loglikelihood_rolling(text): a whole text's log-likelihood, in windows of the model's length (wikitext);
- generate_until(context, until): greedy text cut at the stop sequences (GSM8K, TriviaQA).

Tokens are those of the harness's `hf` backend, so that a model scores here what its Hugging Face export
scores there: a context and continuation are encoded together and split where the context's own tokens
end, special tokens (a Llama's BOS) are added where the model's Hugging Face tokenizer adds them, and an
empty context is the BOS token (else EOS).

Scoring is lightjax/model/score.py's: each context once for all of its continuations. Generation is
lightjax/model/generate.py's cached decoding, stopping a row at the first token that holds a stop sequence.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from lightjax.data.tokenizers import Tokenizer
from lightjax.model.generate import generate
from lightjax.model.gpt import GPT
from lightjax.model.score import Scorer, rows_bucket
from lightjax.runtime.sharding import RULE_SETS, Rules, make_mesh

Request = tuple[Any, list[int], list[int]]  # (the request's strings or None, context ids, continuation ids)


class HarnessModel(TemplateLM):
    """An lm_eval model over a lightjax GPT and its parameters, with the model's tokenizer.

    `batch_size` rows per forward pass (rounded up to a multiple of the mesh's batch shards); `max_length`
    tokens of context (default the model's block_size); `mesh` and `rules` where the parameters are
    sharded (a training run's), else a data-parallel mesh over every device with the parameters
    replicated. `params` may be set later (a training run's at each evaluation)."""

    def __init__(self, model: GPT, params: Any, tokenizer: Tokenizer, *, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, mesh: Any = None,
                 rules: Rules | None = None, name: str = "lightjax", quiet: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not a positive number of rows.")
        block = model.config.block_size
        if max_length is not None and not 1 < max_length <= block:
            raise ValueError(f"max_length={max_length} is not in [2, {block}] (the model's block_size).")
        if mesh is None:
            mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.model, self.params, self.tokenizer, self.name = model, params, tokenizer, name
        self.mesh, self.rules = mesh, rules or RULE_SETS["replicated"]
        self._max_length, self._max_gen_toks = max_length or block, max_gen_toks
        self.scorer = Scorer(model, self.mesh, self.rules, batch_size, self._max_length)
        self.batch_size = self.scorer.batch_size
        bos = tokenizer.bos_id
        self._bos_text = None if bos is None else tokenizer.decode([bos])
        self.quiet = quiet  # no progress bars (inside a training run)
        self._stops: dict[tuple[str, ...], list[int]] = {}  # stop sequences -> the ids that hold one

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise ValueError(f"The {self.tokenizer.kind!r} tokenizer has no EOS token, which generate_until stops "
                             "at; evaluate a model whose tokenizer has one (byte, SentencePiece, Hugging Face).")
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is, and what a rolling window's first token is predicted from."""
        for token in (self.tokenizer.bos_id, self.tokenizer.eos_id):
            if token is not None:
                return token
        raise ValueError(f"The {self.tokenizer.kind!r} tokenizer has neither BOS nor EOS, which the harness puts "
                         "before a text that has no context; use tasks whose every request has one.")

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"{self.name}:{self.tokenizer.kind}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As the hf backend: special tokens added unless asked not to, or the text already starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = self._bos_text is None or not string.startswith(self._bos_text)
        encode = self.tokenizer.encode_with_special_tokens if add_special_tokens else self.tokenizer.encode
        ids = encode(string).tolist()
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each request's continuation after its context."""
        with tqdm(total=len(requests), disable=disable_tqdm or self.quiet, desc="Scoring") as bar:
            results = self.scorer(self.params, [(ctx, cont) for _, ctx, cont in requests], bar.update)
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood: its tokens (with the special tokens the tokenizer adds) predicted in
        windows of max_length, the first from the prefix token, each token once (the harness's windows)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation (greedy unless its task samples), cut before the first stop sequence
        or EOS; contexts are cut from the left to leave room for the task's max_gen_toks."""
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same generation settings
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.quiet, desc="Generating") as bar:
            for members in groups.values():
                settings = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
                for i, text in zip(members, self._generate([requests[i].args[0] for i in members], settings),
                                   strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        return out

    def _generate(self, contexts: list[str], settings: dict[str, Any]) -> list[str]:
        until = handle_stop_sequences(settings.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        max_new = int(settings.pop("max_gen_toks"))
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}.")
        sampling = dict(temperature=float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0,
                        top_k=int(settings.get("top_k") or 0), top_p=float(settings.get("top_p") or 1.0))
        ids = [self.tok_encode(c, left_truncate_len=room) for c in contexts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        texts: list[str] = [""] * len(ids)
        stop_ids = self._stop_ids(tuple(until))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = rows_bucket(len(chunk), self.scorer.shards)  # a few batch sizes, a few programs
            prompts = [ids[i] for i in chunk] + [ids[chunk[-1]]] * (rows - len(chunk))
            new = generate(self.model, self.params, prompts, max_new, eos_id=self.eot_token_id,
                           vocab_size=self.tokenizer.vocab_size, mesh=self.mesh, rules=self.rules, stop_ids=stop_ids,
                           **sampling)
            for i, tokens in zip(chunk, new, strict=False):
                texts[i] = postprocess_generated_text(self.tok_decode(tokens, skip_special_tokens=True), until, None)
        return texts

    def _stop_ids(self, until: tuple[str, ...]) -> list[int]:
        """The ids whose text holds a stop sequence: a row that produces one is done (its text is cut there
        anyway), so that generation ends when every row is, as the hf backend's stopping criteria end it."""
        if until not in self._stops:
            stops = [s for s in until if s]
            self._stops[until] = [i for i in range(self.tokenizer.vocab_size)
                                  if any(s in self.tokenizer.decode([i]) for s in stops)]
        return self._stops[until]

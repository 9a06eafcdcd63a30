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

Scoring: a request is one input row, (context + continuation)[:-1] cut from the left to the model's length;
requests with equal rows (one-token choices after one question) share it. Rows are sorted by length,
batched, right-padded to a power-of-two width (one compiled program per width) and split over the mesh's
batch axes; the program returns each position's target log-probability and whether it is the argmax, and
the final position's log-probabilities of the tokens asked for, never the logits.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from lightjax.data.tokenizers import Tokenizer
from lightjax.model.generate import bucket, generate
from lightjax.model.gpt import GPT
from lightjax.runtime.sharding import RULE_SETS, Rules, make_mesh, shard_batch, with_mesh

Request = tuple[Any, list[int], list[int]]  # (the request's strings or None, context ids, continuation ids)


def _score(model: GPT, params: Any, tokens: jax.Array, last: jax.Array,
           candidates: jax.Array) -> tuple[jax.Array, ...]:
    """For rows `tokens` [B, W] whose last real position is `last` [B]: each position's log-probability of
    the next token in the row and whether it is the argmax ([B, W] each), and at the last position the
    log-probabilities of `candidates` [B, K] and the argmax [B]."""
    logits = model.apply({"params": params}, tokens).astype(jnp.float32)
    norm = jax.nn.logsumexp(logits, axis=-1)  # [B, W]; no log-softmax of the whole [B, W, V] is kept
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    target_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - norm
    greedy = jnp.argmax(logits, axis=-1)
    final = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, V]
    final_lp = jnp.take_along_axis(final, candidates, axis=-1) - jnp.take_along_axis(norm, last[:, None], axis=1)
    return target_lp, greedy == targets, final_lp, jnp.take_along_axis(greedy, last[:, None], axis=1)[:, 0]


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
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // shards) * shards
        self._max_length, self._max_gen_toks = max_length or block, max_gen_toks
        self._score = jax.jit(functools.partial(_score, model))
        bos = tokenizer.bos_id
        self._bos_text = None if bos is None else tokenizer.decode([bos])
        self.rows_scored = 0  # forward-pass rows (requests that share a row count once), for benchmarks
        self.quiet = quiet  # no progress bars (inside a training run)

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
        rows: dict[tuple[int, ...], list[int]] = {}  # input row -> the final tokens asked for after it
        keys = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError(f"A request's continuation encodes to no token (context ends {context[-8:]}).")
            if len(continuation) > self.max_length:
                raise ValueError(f"A continuation of {len(continuation)} tokens is longer than max_length="
                                 f"{self.max_length}.")
            row = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            asked = rows.setdefault(row, [])
            if continuation[-1] not in asked:
                asked.append(continuation[-1])
            keys.append((row, len(continuation), continuation[-1]))
        scores = self._score_rows(rows, disable_tqdm)
        results = []
        for (row, n, final), (target_lp, greedy, final_lp, final_greedy) in zip(
                keys, (scores[k[0]] for k in keys), strict=True):
            span = slice(len(row) - n, len(row) - 1)  # positions predicting the continuation but its last token
            k = rows[row].index(final)
            results.append((float(target_lp[span].sum() + final_lp[k]),
                            bool(greedy[span].all() and final_greedy == final)))
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def _score_rows(self, rows: dict[tuple[int, ...], list[int]], disable_tqdm: bool) -> dict[tuple[int, ...], tuple]:
        """Each row's (target log-probs, is-argmax flags, candidates' log-probs, final argmax), on host."""
        order = sorted(rows, key=lambda r: (-len(r), r))
        k = bucket(max((len(c) for c in rows.values()), default=1), minimum=1)
        out = {}
        with tqdm(total=len(order), disable=disable_tqdm or self.quiet, desc="Scoring rows") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = min(bucket(len(chunk[0])), self.max_length)
                tokens = np.zeros((self.batch_size, width), np.int32)
                last = np.zeros(self.batch_size, np.int32)
                candidates = np.zeros((self.batch_size, k), np.int32)
                for i, row in enumerate(chunk):
                    tokens[i, :len(row)], last[i] = row, len(row) - 1
                    candidates[i, :len(rows[row])] = rows[row]
                batch = self._place({"tokens": tokens, "last": last, "candidates": candidates})
                with with_mesh(self.mesh, self.rules):
                    result = [np.asarray(x) for x in self._score(self.params, **batch)]
                for i, row in enumerate(chunk):
                    out[row] = tuple(x[i] for x in result)
                self.rows_scored += len(chunk)
                bar.update(len(chunk))
        return out

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a batch (every process holds the same requests), on the mesh."""
        rows = self.batch_size // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        return shard_batch({key: x[mine] for key, x in batch.items()}, self.mesh)

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
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            prompts = [ids[i] for i in chunk] + [ids[chunk[-1]]] * (self.batch_size - len(chunk))  # one program
            new = generate(self.model, self.params, prompts, max_new, eos_id=self.eot_token_id,
                           vocab_size=self.tokenizer.vocab_size, mesh=self.mesh, rules=self.rules, **sampling)
            for i, tokens in zip(chunk, new, strict=False):
                texts[i] = postprocess_generated_text(self.tok_decode(tokens, skip_special_tokens=True), until, None)
        return texts

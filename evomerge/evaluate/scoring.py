"""Native scoring kernels: continuation log-likelihoods and greedy decoding, batched by length.

Tokenization follows lm-eval's HFLM: the tokenizer's default special tokens, trailing whitespace of
the context moved into the continuation, the continuation = tokens of (context + continuation) past
the context's tokens, and an empty context replaced by the BOS (else EOS) token. Inputs longer than
the model's context are cut from the left.

Batches are left-padded (with matching position ids), so every row's continuation sits in the last
positions and the LM head runs on those positions only (`logits_to_keep`); the log-softmax runs over
the distinct scored positions only, never over the whole sequence. Requests with identical input
tokens (e.g. the single-token choices of one question) share one row and its log-softmax.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class Batch:
    """Left-padded token batch, rows right-aligned.

    Prompt batches: row r holds prompt `request_ids[r]`. Log-likelihood batches: requests
    `request_ids` are scored from the rows; requests with identical input tokens share one row
    (e.g. single-token choices of one question), each gathering its own continuation tokens.
    """

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    position_ids: torch.Tensor  # (B, T) int64
    request_ids: torch.Tensor  # prompt batches: (B,); log-likelihood batches: (R,) requests scored
    keep: int = 1  # how many final positions need logits
    pos_row: torch.Tensor | None = None  # (M,) distinct scored positions: row ...
    pos_pos: torch.Tensor | None = None  # (M,) ... and index among the last `keep` positions
    tok_slot: torch.Tensor | None = None  # (N,) scored continuation token -> its position (0..M-1)
    tok_target: torch.Tensor | None = None  # (N,) the token id to score
    tok_request: torch.Tensor | None = None  # (N,) which of `request_ids` the token belongs to

    def to(self, device) -> "Batch":
        """This batch with its model-side tensors on `device` (`request_ids` stays on the CPU)."""
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) and f.name != "request_ids" else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)


def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context (BOS, else EOS), as in lm-eval."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand in for an empty prompt")
    return tid


def pad_token_id(tokenizer) -> int:
    """Any valid id to fill padding with (it is masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    return 0


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation) pair, lm-eval's `_encode_pair` rule."""
    moved = []
    for ctx, cont in pairs:
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces and ctx.strip():
            ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
        moved.append((ctx, cont))
    nonempty = [i for i, (ctx, _) in enumerate(moved) if ctx]
    ctx_ids = _encode(tokenizer, [moved[i][0] for i in nonempty], special=True)
    whole_ids = _encode(tokenizer, [moved[i][0] + moved[i][1] for i in nonempty], special=True)
    out: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)
    for i, c, w in zip(nonempty, ctx_ids, whole_ids):
        out[i] = (c, w[len(c):])
    empty = [i for i, (ctx, _) in enumerate(moved) if not ctx]
    if empty:
        prefix = prefix_token_id(tokenizer)
        for i, cont in zip(empty, _encode(tokenizer, [moved[i][1] for i in empty], special=False)):
            out[i] = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    return out  # type: ignore[return-value]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids for generation (default special tokens; empty prompt -> [BOS])."""
    ids = _encode(tokenizer, list(prompts), special=True)
    prefix = None
    for i, row in enumerate(ids):
        if not row:
            prefix = prefix_token_id(tokenizer) if prefix is None else prefix
            ids[i] = [prefix]
    return ids


def _encode(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    """Batch-encode texts to id lists (no padding, no truncation)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def model_max_length(model) -> int | None:
    """The model's context length from its config, if it declares one."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of `rows` right-aligned in a (B, max_len) batch."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def build_loglik_batches(
    requests: Sequence[tuple[list[int], list[int]]],
    request_ids: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    max_length: int | None,
) -> list[Batch]:
    """Batches of `batch_size` distinct input rows, longest first, each continuation at the row's end.

    A request's input is (context + continuation)[:-1], cut from the left to `max_length`; requests
    with the same input share a row (a causal LM's logits there are the same for all of them).
    """
    rows: dict[tuple[int, ...], list[int]] = {}
    for r in request_ids:
        ctx, cont = requests[r]
        toks = ctx + cont
        if max_length is not None:
            toks = toks[-(max_length + 1):]
        rows.setdefault(tuple(toks[:-1]), []).append(r)
    order = sorted(rows, key=lambda k: (-len(k), rows[k][0]))
    batches = []
    for lo in range(0, len(order), batch_size):
        keys = order[lo:lo + batch_size]
        ids, mask, pos = _left_pad([list(k) for k in keys], pad_id)
        members = [(b, r) for b, k in enumerate(keys) for r in rows[k]]
        keep = max(len(requests[r][1]) for _, r in members)
        slots: dict[tuple[int, int], int] = {}  # (row, position) -> slot; shared by requests of a row
        tok_slot, tok_target, tok_request = [], [], []
        for j, (b, r) in enumerate(members):
            cont = requests[r][1]
            for i, t in enumerate(cont):
                tok_slot.append(slots.setdefault((b, keep - len(cont) + i), len(slots)))
                tok_target.append(t)
                tok_request.append(j)
        batches.append(Batch(
            ids, mask, pos, torch.tensor([r for _, r in members], dtype=torch.long), keep,
            pos_row=torch.tensor([b for b, _ in slots], dtype=torch.long),
            pos_pos=torch.tensor([p for _, p in slots], dtype=torch.long),
            tok_slot=torch.tensor(tok_slot, dtype=torch.long),
            tok_target=torch.tensor(tok_target, dtype=torch.long),
            tok_request=torch.tensor(tok_request, dtype=torch.long),
        ))
    return batches


def build_prompt_batches(
    prompts: Sequence[list[int]], prompt_ids: Sequence[int], *, batch_size: int, pad_id: int, max_prompt: int | None
) -> list[Batch]:
    """Left-padded prompt batches for generation, longest first, prompts cut to `max_prompt` tokens."""
    order = sorted(prompt_ids, key=lambda p: (-len(prompts[p]), p))
    batches = []
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        rows = [prompts[p][-max_prompt:] if max_prompt else prompts[p] for p in chunk]
        ids, mask, pos = _left_pad(rows, pad_id)
        batches.append(Batch(ids, mask, pos, torch.tensor(chunk, dtype=torch.long)))
    return batches


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model) -> frozenset[str]:
    """Parameter names of the model's forward (cached per class)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMS:
        _FORWARD_PARAMS[cls] = frozenset(inspect.signature(model.forward).parameters)
    return _FORWARD_PARAMS[cls]


def _supports_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep`."""
    return "logits_to_keep" in _forward_params(model)


def _cache_kwarg(model) -> str:
    """The KV-cache argument name: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _cache_of(out):
    """The KV cache returned by a forward pass, under either name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _last_logits(model, batch: Batch, keep: int, params=None, **kwargs) -> torch.Tensor:
    """Logits of the last `keep` positions of a forward pass over `batch` (with `params` standing in for
    the model's own tensors of those names, ``torch.func.functional_call``, when given)."""
    extra = {"logits_to_keep": keep} if _supports_logits_to_keep(model) else {}
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  **extra, **kwargs)
    out = model(**inputs) if params is None else torch.func.functional_call(model, params, (), inputs)
    return out.logits[:, -keep:], out


def continuation_logprobs(model, batch: Batch, params=None) -> torch.Tensor:
    """Σ log p(continuation token | prefix) per request of a log-likelihood batch, in float32 (differentiable
    in `params`, tensors that stand in for the model's own, when given)."""
    logits, _ = _last_logits(model, batch, batch.keep, params, use_cache=False)
    picked = logits[batch.pos_row, batch.pos_pos].float()  # (M, V): only the distinct scored positions
    log_z = torch.logsumexp(picked, dim=-1)
    token_lp = picked[batch.tok_slot, batch.tok_target] - log_z[batch.tok_slot]
    sums = torch.zeros(batch.request_ids.shape[0], dtype=torch.float32, device=token_lp.device)
    return sums.index_add_(0, batch.tok_request, token_lp)


def greedy_generate(model, batch: Batch, max_new_tokens: int, stop_ids: torch.Tensor) -> torch.Tensor:
    """Greedy continuation ids (B, ≤max_new_tokens) with a KV cache; stops when every row hit a stop id.

    Written out rather than `model.generate`, which merges the checkpoint's generation_config
    (suppress_tokens, repetition_penalty, min_new_tokens, ...) into any config passed to it.
    Rows that stopped keep decoding until all have; the caller cuts each row at its first stop.
    """
    mask = batch.attention_mask
    logits, out = _last_logits(model, batch, 1, use_cache=True)
    cache, cache_kw = _cache_of(out), _cache_kwarg(model)
    next_pos = batch.position_ids[:, -1:] + 1
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    steps = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        steps.append(token)
        done |= torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
            use_cache=True, **{cache_kw: cache},
        )
        logits, cache = out.logits, _cache_of(out)
        next_pos = next_pos + 1
    return torch.stack(steps, dim=1)


def stop_token_ids(tokenizer, stops: Sequence[str], extra: Sequence[int] = ()) -> list[int]:
    """Ids of tokens whose text contains a stop string, plus `extra` (EOS ids)."""
    ids = set(int(i) for i in extra if i is not None)
    if stops:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids.update(i for i, t in enumerate(texts) if any(s in t for s in stops))
    return sorted(ids)


def decode_continuation(tokenizer, prompt: list[int], generated: list[int], eos_ids: set[int], stop_ids: set[int]) -> str:
    """Text of `generated` after `prompt`, cut before the first EOS and after the first stop token.

    Decodes prompt+generation and drops the decoded prompt, so a word-initial space survives
    (decoding the new tokens alone loses it for SentencePiece and word-level tokenizers).
    """
    for j, t in enumerate(generated):
        if t in eos_ids:
            generated = generated[:j]
            break
        if t in stop_ids:
            generated = generated[: j + 1]
            break
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    full = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(generated, skip_special_tokens=True)

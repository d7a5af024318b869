"""The built-in offline demo model zoo: a base LM, task experts and a multi-task reference.

Everything is generated locally and deterministically from a seed (no Hub, no downloads):

- a word-level tokenizer over a fixed vocabulary (numbers, letters, capitals, colours, task
  keywords, a few words);
- a Llama-style **base** model pre-trained briefly on generic synthetic text (ordered runs,
  copies, template sentences) and keyword skills (``copy``, ``next``, ``up``), with a small share
  of examples of every zoo task mixed in: like a real pretrained LM, it knows every token, how a
  keyword selects a behaviour and the task formats, and has partial skill on every task;
- one **expert** per task family (``rev``, ``map``, ``cmp``, ``cnt``), fully fine-tuned from the
  base on that family plus a little replay of the generic data, until it masters that task;
- a **multi-task reference**, fine-tuned the same way on all families together: the upper bound a
  merge of the experts aims at;
- the task data as JSONL (search / validation / test, plus the train split the models saw) and task
  YAMLs in evomerge's task format (one per task plus ``tasks.yaml`` with all of them).

This is the regime merging methods are designed for: each task vector refines skills the base
already has (6-8% of the base's weight norm in the small zoo) rather than building a new skill
from nothing, so scaling a task vector down weakens its skill gradually instead of erasing it. A
base that scores zero on a task leaves nothing to refine, and its experts' task vectors interfere
all-or-nothing. Each family reads and writes its own token domain, but all experts rewrite the
same attention and MLP weights, and two of them (``rev``, ``map``) are three-token sequence
transforms built on the same copying circuit. Their task vectors are dense (AdamW) and interfere
when added: the default merges (weight 1, density 1: four full task vectors on top of each
other) land far below the multi-task reference, while re-weighted or sparsified merges do
markedly better, so a search has room to win. ``zoo_report.md`` inside the zoo holds the measured
test-split table.

A build happens in a temporary directory next to the target and is renamed into place; a marker
file, written last, records the build parameters, so :func:`build_zoo` returns a complete zoo
from the cache at once and rebuilds an incomplete or different one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from evomerge.checkpoint import staging_dir
from evomerge.tiny import SPECIAL_TOKENS, build_tiny_model, make_tokenizer, save_model, tiny_config

ZOO_VERSION = 3  # bump when the data, training code or written files change what a build produces
# (3: the task YAMLs list each task's train split, for `evomerge finetune`; models and data as in 2)
MARKER_NAME = "zoo.json"
REPORT_NAME = "zoo_report.md"
_ZOO_ENTRIES = {"base", "experts", "adapters", "multitask", "data", "tasks", "tasks.yaml", REPORT_NAME, MARKER_NAME}

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
UPPER = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
NUMBERS = [str(i) for i in range(100)]
COLORS = ["red", "blue", "green", "pink", "gray", "gold", "teal", "tan"]
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
TASK_WORDS = ["rev", "map", "cmp", "cnt", "in", "=", "?", "copy", "next", "up"]
TEXT_NOUNS = ["cat", "dog", "bird", "fish", "tree", "car", "house", "ball"]
TEXT_VERBS = ["sees", "likes", "eats", "finds", "has", "wants"]
TEXT_ADJS = ["big", "small", "old", "new"]
TEXT_WORDS = ["the", "a", "and", ".", "|", *TEXT_NOUNS, *TEXT_VERBS, *TEXT_ADJS]
VOCAB = [*NUMBERS, *LETTERS, *UPPER, *COLORS, *COUNT_WORDS, *TASK_WORDS, *TEXT_WORDS]


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooSize:
    """Model shape, task families, training schedule and split sizes of one zoo size."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    families: tuple[str, ...]
    base_steps: int
    base_lr: float
    expert_steps: int
    multitask_steps: int
    finetune_lr: float
    n_train: int  # training examples per task (the models see these only)
    n_search: int
    n_validation: int
    n_test: int
    num_heads: int = 4
    num_kv_heads: int = 2
    batch_size: int = 32
    replay: float = 0.25  # share of generic base data mixed into every fine-tune
    n_generic: int = 6000  # generic pre-training lines
    base_task_share: float = 0.0  # share of task examples (every family) in the base's pre-training


SIZES: dict[str, ZooSize] = {
    # tests: three experts, high learning rate so they specialize in a few steps
    "tiny": ZooSize(
        hidden_size=64, num_layers=2, intermediate_size=128, families=("rev", "map", "cmp"),
        base_steps=800, base_lr=3e-3, expert_steps=200, multitask_steps=400, finetune_lr=1e-3,
        n_train=2000, n_search=48, n_validation=48, n_test=96, n_generic=3000, base_task_share=0.15,
    ),
    # the demo: four experts whose task vectors interfere, but not hopelessly
    "small": ZooSize(
        hidden_size=96, num_layers=3, intermediate_size=256, families=("rev", "map", "cmp", "cnt"),
        base_steps=1000, base_lr=2e-3, expert_steps=400, multitask_steps=1200, finetune_lr=3e-4,
        n_train=6000, n_search=128, n_validation=128, n_test=256, base_task_share=0.15,
    ),
}




@dataclass(frozen=True)
class ZooVariant:
    """How a zoo departs from its size's defaults, to vary what makes merging hard.

    The default variant is the size's own zoo. ``experts``: how many task families (and experts) the
    zoo has, the first ``experts`` of ``FAMILY_ORDER`` (2 to 8); ``base_knows_tasks=False``: the base
    never sees a task example, so each expert builds its skill from nothing; ``overlap``: expert i is
    fine-tuned on families i and i+1 (cyclically), so experts share skills; ``dtype``: the dtype every
    model is saved in (training runs in float32).
    """

    experts: int | None = None
    base_knows_tasks: bool = True
    overlap: bool = False
    dtype: str = "float32"

    def check(self, size: str) -> None:
        """Raise ValueError naming the option that a zoo of `size` cannot have."""
        if self.experts is not None and not 2 <= self.experts <= len(FAMILY_ORDER):
            raise ValueError(f"zoo experts must be between 2 and {len(FAMILY_ORDER)}, got {self.experts}")
        if self.overlap and len(self.families(size)) < 3:
            raise ValueError("zoo overlap needs at least 3 experts (with 2, both experts would see both tasks)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"zoo dtype must be float32 or bfloat16, got {self.dtype!r}")

    def families(self, size: str) -> tuple[str, ...]:
        """The task families of a zoo of `size` with this variant."""
        return zoo_size(size).families if self.experts is None else FAMILY_ORDER[: self.experts]

    def is_default(self, size: str) -> bool:
        return self.tag(size) == ""

    def tag(self, size: str) -> str:
        """A short name for what differs from the size's default zoo ('' for none), e.g. '-e8-naive-bf16'."""
        parts = []
        if self.families(size) != zoo_size(size).families:
            parts.append(f"e{len(self.families(size))}")
        if not self.base_knows_tasks:
            parts.append("naive")
        if self.overlap:
            parts.append("overlap")
        if self.dtype != "float32":
            parts.append("bf16")
        return "".join(f"-{p}" for p in parts)

    def spec(self, size: str) -> ZooSize:
        """The size's training and data settings with this variant's families and base data."""
        base = zoo_size(size)
        return dataclasses.replace(base, families=self.families(size),
                                   base_task_share=base.base_task_share if self.base_knows_tasks else 0.0)

    def expert_tasks(self, size: str) -> dict[str, tuple[str, ...]]:
        """Each expert's name and the families it is fine-tuned on."""
        fams = self.families(size)
        if not self.overlap:
            return {f: (f,) for f in fams}
        pairs = [(fams[i], fams[(i + 1) % len(fams)]) for i in range(len(fams))]
        return {"+".join(p): p for p in pairs}


# ---------------------------------------------------------------------------------------------
# Task families
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFamily:
    """A synthetic task: how to draw one example and how evomerge's task format scores it."""

    name: str
    description: str
    make: Callable[[random.Random, dict[str, Any]], dict[str, Any]]
    spec: dict[str, Any]  # task-format fields besides name and splits

    def key(self, example: dict[str, Any]) -> str:
        """The identity of an example (its prompt), used to keep splits disjoint."""
        return self.spec["prompt"].format(**example)

    def completion(self, example: dict[str, Any]) -> tuple[str, str]:
        """(prompt, gold continuation) of an example, as the models are trained on it."""
        prompt = self.spec["prompt"].format(**example)
        if self.spec["kind"] == "multiple_choice":
            gold = example[self.spec["choices_field"]][example["label"]]
            return prompt, self.spec["choice"].format(choice=gold)
        return prompt, self.spec["target"].format(**example)


def _rev_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """rev a b c = -> c b a: reverse three letters."""
    seq = [rng.choice(LETTERS) for _ in range(3)]
    return {"question": " ".join(seq), "answer": " ".join(reversed(seq))}


def _map_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """map A B C = -> f(A) f(B) f(C): a fixed random cipher of capitals, applied one by one."""
    seq = [rng.choice(UPPER) for _ in range(3)]
    return {"question": " ".join(seq), "answer": " ".join(ctx["cipher"][c] for c in seq)}


def _cmp_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """cmp 37 82 ? -> 82: the larger of two numbers, as a two-way multiple choice."""
    a, b = rng.sample(range(100), 2)
    return {"question": f"{a} {b}", "choices": [str(a), str(b)], "label": int(b > a)}


def _cnt_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """cnt red in red tan red gold = -> two: how often a colour occurs in four colours."""
    target = rng.choice(COLORS)
    k = rng.randint(0, 3)
    others = [c for c in COLORS if c != target]
    seq = [target] * k + [rng.choice(others) for _ in range(4 - k)]
    rng.shuffle(seq)
    return {"item": target, "question": " ".join(seq), "answer": COUNT_WORDS[k]}


def _srt_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """tree c a b = -> a b c: sort three letters."""
    seq = [rng.choice(LETTERS) for _ in range(3)]
    return {"question": " ".join(seq), "answer": " ".join(sorted(seq))}


def _add_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """car 12 7 = -> 19: the sum of two numbers below 100."""
    a = rng.randrange(99)
    b = rng.randrange(100 - a)
    return {"question": f"{a} {b}", "answer": str(a + b)}


def _par_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """house 37 12 ? -> one: the parity of the sum of two numbers, as a two-way multiple choice."""
    a, b = rng.randrange(100), rng.randrange(100)
    return {"question": f"{a} {b}", "choices": ["zero", "one"], "label": (a + b) % 2}


def _prv_example(rng: random.Random, ctx: dict[str, Any]) -> dict[str, Any]:
    """ball 37 c = -> 36 b: the predecessors of a number and a letter (the base's `next`/`up` run upwards)."""
    n, i = rng.randrange(1, 100), rng.randrange(1, len(LETTERS))
    return {"question": f"{n} {LETTERS[i]}", "answer": f"{n - 1} {LETTERS[i - 1]}"}


def generate_spec(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """A generation task's format: the answer after the prompt, scored by exact match once stripped."""
    return {"kind": "generate", "prompt": prompt, "target": " {answer}", "metric": "exact_match",
            "normalize": ["strip"], "max_new_tokens": max_new_tokens}


def choice_spec(prompt: str) -> dict[str, Any]:
    """A multiple-choice task's format: each choice after the prompt, scored by accuracy."""
    return {"kind": "multiple_choice", "prompt": prompt, "choices_field": "choices", "choice": " {choice}",
            "metric": "acc"}


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in [
    TaskFamily("rev", "reverse three letters", _rev_example, generate_spec("rev {question} =", 3)),
    TaskFamily("map", "apply a fixed cipher to three capitals", _map_example, generate_spec("map {question} =", 3)),
    TaskFamily("cmp", "pick the larger of two numbers (multiple choice)", _cmp_example, choice_spec("cmp {question} ?")),
    TaskFamily("cnt", "count a colour in four colours", _cnt_example, generate_spec("cnt {item} in {question} =", 1)),
    # the families below extend a zoo to 8 experts (`experts:`); their keywords are vocabulary words
    # of the generic text, so every zoo shares one tokenizer
    TaskFamily("srt", "sort three letters", _srt_example, generate_spec("tree {question} =", 3)),
    TaskFamily("add", "add two numbers", _add_example, generate_spec("car {question} =", 1)),
    TaskFamily("par", "the parity of a sum (multiple choice)", _par_example, choice_spec("house {question} ?")),
    TaskFamily("prv", "the predecessors of a number and a letter", _prv_example, generate_spec("ball {question} =", 2)),
]}
FAMILY_ORDER = tuple(FAMILIES)  # a zoo of n experts uses the first n families


def _cipher(seed: int) -> dict[str, str]:
    """A seeded permutation of the capitals with no fixed points (so `map` never equals copying)."""
    rng = random.Random(f"zoo-cipher-{seed}")
    while True:
        perm = UPPER[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(UPPER, perm)):
            return dict(zip(UPPER, perm))


def make_task_data(
    family: TaskFamily, size: ZooSize, seed: int, ctx: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Examples of one family for splits train/search/validation/test, disjoint by prompt."""
    rng = random.Random(f"zoo-data-{family.name}-{seed}")
    wanted = {"search": size.n_search, "validation": size.n_validation, "test": size.n_test,
              "train": size.n_train}
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split, n in wanted.items():
        rows: list[dict[str, Any]] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"task {family.name}: cannot draw {n} distinct {split} examples")
            ex = family.make(rng, ctx)
            k = family.key(ex)
            # evaluation splits are unique and disjoint; train only avoids the evaluation prompts
            if k in seen:
                continue
            if split != "train":
                seen.add(k)
            rows.append(ex)
        out[split] = rows
    return out


def _generic_text(rng: random.Random, max_words: int) -> str:
    """One line of generic pre-training text: runs, lists, copies and template sentences."""
    runs = [NUMBERS, LETTERS, UPPER, COUNT_WORDS]
    parts: list[str] = []
    while sum(len(p.split()) for p in parts) < max_words:
        kind = rng.randrange(4)
        if kind == 0:  # an ordered run: 41 42 43 / c d e f / K L M / two three four
            run = rng.choice(runs)
            start = rng.randrange(len(run) - 3)
            parts.append(" ".join(run[start : start + rng.randint(3, 5)]))
        elif kind == 1:  # a random list over one domain, then "|" and the same list again
            domain = rng.choice([NUMBERS, LETTERS, UPPER, COLORS])
            seq = " ".join(rng.choice(domain) for _ in range(rng.randint(2, 4)))
            parts.append(f"{seq} | {seq}")
        elif kind == 2:  # a list of colours
            parts.append(" ".join(rng.choice(COLORS) for _ in range(rng.randint(3, 6))))
        else:
            words = ["the", rng.choice(TEXT_ADJS), rng.choice(TEXT_NOUNS), rng.choice(TEXT_VERBS),
                     rng.choice(["the", "a"]), rng.choice(TEXT_NOUNS), "."]
            parts.append(" ".join(words))
    return " ".join(" ".join(parts).split()[:max_words])


def _generic_skill(rng: random.Random) -> tuple[str, str]:
    """A keyword-led generic skill the base learns: copy, number successor, letter successor."""
    kind = rng.randrange(3)
    if kind == 0:
        domain = rng.choice([NUMBERS, LETTERS, UPPER, COLORS])
        seq = " ".join(rng.choice(domain) for _ in range(rng.randint(2, 4)))
        return f"copy {seq} =", f" {seq}"
    if kind == 1:
        n = rng.randrange(99)
        return f"next {n} =", f" {n + 1}"
    run = rng.choice([LETTERS, UPPER, COUNT_WORDS])
    i = rng.randrange(len(run) - 1)
    return f"up {run[i]} =", f" {run[i + 1]}"


def generic_pairs(rng: random.Random, n: int, max_words: int = 16) -> list[tuple[str, str]]:
    """n (prompt, continuation) pairs of generic data: half free text, half keyword skills."""
    return [("", _generic_text(rng, max_words)) if rng.random() < 0.5 else _generic_skill(rng)
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _encode(tok, text: str) -> list[int]:
    """Token ids of whitespace-separated text (the zoo tokenizer adds no special tokens)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def _encode_pairs(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids + eos) for each (prompt, continuation) pair."""
    return [(_encode(tok, p), _encode(tok, c) + [tok.eos_token_id]) for p, c in pairs]


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and labels (loss on the continuation only)."""
    length = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, (p, c) in enumerate(encoded):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return ids, mask, labels


def train_lm(
    model,
    examples: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    log: Callable[[str], None] | None = None,
):
    """Training of the parameters that require grad (all of them: full fine-tuning; a PEFT model's: its
    adapter) with AdamW (no weight decay), linear warm-up and linear decay to 0.

    Batches are drawn with replacement from a generator seeded with `seed`, so the result
    depends only on the inputs (on one thread with deterministic algorithms).
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    running = None
    for step in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        ids, mask, labels = _collate([examples[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if log and (step + 1) % max(1, steps // 2) == 0:
            log(f"    step {step + 1}/{steps}  loss {running:.3f}")
    model.eval()
    return model


def derived_seed(seed: int, label: str) -> int:
    """A 31-bit seed derived from the zoo seed and a label (stable across runs and platforms)."""
    return int(hashlib.sha256(f"evomerge-zoo-{seed}-{label}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


class Deterministic:
    """Context: one intra-op thread, deterministic algorithms and no transformers progress bars.

    One thread makes the reductions' order (hence the bits) independent of the core count and
    keeps a build steady on a shared machine; the settings are restored on exit.
    """

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._threads = torch.get_num_threads()
        self._det = torch.are_deterministic_algorithms_enabled()
        self._bars = hf_logging.is_progress_bar_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(self._det)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False


# ---------------------------------------------------------------------------------------------
# The zoo's ingredients (each a pure function of size and seed)
# ---------------------------------------------------------------------------------------------


def zoo_size(size: str) -> ZooSize:
    """The ZooSize called `size`, with a clear error for unknown names."""
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {', '.join(SIZES)}")
    return SIZES[size]


def zoo_tokenizer():
    """The zoo's word-level tokenizer (special tokens first, then VOCAB)."""
    return make_tokenizer(VOCAB)


def zoo_config(size: str, tokenizer=None):
    """The Llama config of the zoo's models at `size`."""
    spec = zoo_size(size)
    tok = tokenizer or zoo_tokenizer()
    return tiny_config(
        "llama", vocab_size=len(tok), num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
    )


def make_zoo_data(size: str, seed: int, variant: ZooVariant = ZooVariant()) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per task, per split (train/search/validation/test), the example rows; deterministic."""
    spec = variant.spec(size)
    ctx = {"cipher": _cipher(seed)}
    return {name: make_task_data(FAMILIES[name], spec, seed, ctx) for name in spec.families}


def _generic_examples(tok, spec: ZooSize, seed: int) -> list[tuple[list[int], list[int]]]:
    """The encoded generic pre-training data (also the replay data of every fine-tune)."""
    rng = random.Random(f"zoo-generic-{seed}")
    return _encode_pairs(tok, generic_pairs(rng, spec.n_generic))


def finetune_examples(tok, spec: ZooSize, seed: int, data, tasks: list[str]):
    """Encoded training examples of `tasks`, plus `spec.replay` of generic data."""
    pairs = [FAMILIES[t].completion(row) for t in tasks for row in data[t]["train"]]
    examples = _encode_pairs(tok, pairs)
    generic = _generic_examples(tok, spec, seed)
    n_replay = int(round(len(examples) * spec.replay / (1 - spec.replay)))
    rng = random.Random(f"zoo-replay-{seed}-{'+'.join(tasks)}")
    return examples + [generic[rng.randrange(len(generic))] for _ in range(n_replay)]


def _pretraining_examples(tok, spec: ZooSize, seed: int, data):
    """The base's pre-training data: the generic data plus `spec.base_task_share` of task examples.

    The task examples are drawn uniformly from every family's train split (the prompts the experts
    train on; never an evaluation prompt), so the base sees every task format a little.
    """
    generic = _generic_examples(tok, spec, seed)
    if not spec.base_task_share:
        return generic
    tasks = _encode_pairs(tok, [FAMILIES[t].completion(row) for t in spec.families for row in data[t]["train"]])
    n_task = int(round(len(generic) * spec.base_task_share / (1 - spec.base_task_share)))
    rng = random.Random(f"zoo-pretrain-mix-{seed}")
    return generic + [tasks[rng.randrange(len(tasks))] for _ in range(n_task)]


def train_base(size: str, seed: int, tokenizer=None, data=None, log=None, variant: ZooVariant = ZooVariant()):
    """The base model: seeded init, then pre-training on generic text and a little task data (deterministic)."""
    spec = variant.spec(size)
    tok = tokenizer or zoo_tokenizer()
    data = data if data is not None else make_zoo_data(size, seed, variant)
    with Deterministic():
        model = build_tiny_model(zoo_config(size, tok), seed=derived_seed(seed, "init"))
        train_lm(model, _pretraining_examples(tok, spec, seed, data), steps=spec.base_steps, lr=spec.base_lr,
                 batch_size=spec.batch_size, seed=derived_seed(seed, "base"), pad_id=tok.pad_token_id, log=log)
    return model


def finetune(base_model, tasks: list[str], size: str, seed: int, tokenizer=None, data=None, log=None,
             steps: int | None = None):
    """A full fine-tune of a copy of `base_model` on `tasks` (default steps: an expert's for one task,
    the multi-task reference's for more).

    Deterministic: the same base, tasks, size and seed give bit-identical weights.
    """
    spec = zoo_size(size)
    tok = tokenizer or zoo_tokenizer()
    data = data if data is not None else make_zoo_data(size, seed)
    if steps is None:
        steps = spec.expert_steps if len(tasks) == 1 else spec.multitask_steps
    label = "+".join(tasks)
    with Deterministic():
        model = copy.deepcopy(base_model)
        train_lm(model, finetune_examples(tok, spec, seed, data, tasks), steps=steps,
                 lr=spec.finetune_lr, batch_size=spec.batch_size, seed=derived_seed(seed, f"ft-{label}"),
                 pad_id=tok.pad_token_id, log=log)
    return model


def _task_entry(name: str, split_paths: dict[str, str]) -> dict[str, Any]:
    """One task of the task format (TASKS_FORMAT.md), with the given split file paths."""
    return {"name": name, "splits": split_paths, **FAMILIES[name].spec}


def write_zoo_data(data, out_dir: str | Path) -> tuple[Path, dict[str, Path]]:
    """Write data/<task>_<split>.jsonl, tasks.yaml (all tasks) and tasks/<task>.yaml under out_dir.

    Returns (tasks_yaml, {task: its yaml}).
    """
    root = Path(out_dir)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    entries, per_task = [], {}
    for name, splits in data.items():
        for split, rows in splits.items():
            with open(root / "data" / f"{name}_{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        files = {s: f"{name}_{s}.jsonl" for s in ("search", "validation", "test", "train")}
        entries.append(_task_entry(name, {s: f"data/{p}" for s, p in files.items()}))
        per_task[name] = root / "tasks" / f"{name}.yaml"
        _write_yaml(per_task[name], _task_entry(name, {s: f"../data/{p}" for s, p in files.items()}),
                    f"evomerge zoo task {name!r}: {FAMILIES[name].description}")
    tasks_yaml = root / "tasks.yaml"
    _write_yaml(tasks_yaml, {"tasks": entries}, "evomerge zoo: all tasks")
    return tasks_yaml, per_task


def _write_yaml(path: Path, doc: dict[str, Any], comment: str) -> None:
    """Write `doc` as block-style YAML with a leading comment line."""
    path.write_text(f"# {comment}\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The measured table
# ---------------------------------------------------------------------------------------------

DEFAULT_MERGES = ("task_arithmetic", "ties", "dare_ties")


def default_merge_recipe(method: str, base: str, experts: list[str]) -> dict[str, Any]:
    """The mergekit recipe of `method` with default parameters: weight 1 and density 1 for every expert."""
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 1.0}
    return {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": e, "parameters": dict(params)} for e in experts],
        "dtype": "float32",
    }


def measure_zoo(
    zoo: "Zoo", split: str = "test", batch_size: int = 64, log=None
) -> list[tuple[str, dict[str, float], float]]:
    """Rows (model, per-task score, aggregate) on `split`: base, experts, default merges, multitask."""
    from transformers import AutoModelForCausalLM

    from evomerge.engine import merge_in_memory
    from evomerge.evaluate import Evaluator

    tok = zoo.tokenizer()
    ev = Evaluator(zoo.tasks_yaml, tok, split=split, batch_size=batch_size, bootstrap_iters=0)
    rows = []

    def score(label, model):
        res = ev.evaluate(model)
        rows.append((label, dict(res.per_task), res.aggregate))
        if log:
            log(f"  {label:<16} " + "  ".join(f"{t} {v:.2f}" for t, v in res.per_task.items())
                + f"  | mean {res.aggregate:.2f}")

    with Deterministic():
        base = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
        score("base", base)
        states = {"base": base.state_dict()}
        for name, path in zoo.experts.items():
            m = AutoModelForCausalLM.from_pretrained(path).eval()
            score(f"expert:{name}", m)
            states[name] = m.state_dict()
        work = copy.deepcopy(base)
        for method in DEFAULT_MERGES:
            recipe = default_merge_recipe(method, "base", list(zoo.experts))
            merged = merge_in_memory(recipe, states, seed=0)
            work.load_state_dict(merged)
            score(f"{method} (default)", work)
        score("multitask", AutoModelForCausalLM.from_pretrained(zoo.multitask).eval())
    return rows


def render_report(zoo: "Zoo", rows, seconds: float) -> str:
    """zoo_report.md: what the zoo holds, and the measured table."""
    spec = zoo.variant.spec(zoo.size)
    tasks = list(spec.families)
    chance = {t: (0.5 if FAMILIES[t].spec["kind"] == "multiple_choice" else 0.0) for t in tasks}
    lines = [
        f"# evomerge demo zoo ({zoo.size}{zoo.variant.tag(zoo.size)}, seed {zoo.seed})",
        "",
        f"Llama-style models: hidden {spec.hidden_size}, {spec.num_layers} layers, "
        f"intermediate {spec.intermediate_size}, vocabulary {len(SPECIAL_TOKENS) + len(set(VOCAB))} "
        f"words; {zoo.variant.dtype}.",
        f"Base: {spec.base_steps} steps of generic text with {spec.base_task_share:.0%} examples of every task "
        f"mixed in (lr {spec.base_lr:g}). Experts: {spec.expert_steps} "
        f"steps on {'two neighbouring tasks' if zoo.variant.overlap else 'one task'} each; multitask: "
        f"{spec.multitask_steps} steps on all "
        f"(lr {spec.finetune_lr:g}, {int(spec.replay * 100)}% generic replay, full fine-tuning).",
        f"Built in {seconds:.0f} s.",
        "",
        "Tasks: " + "; ".join(f"`{t}`: {FAMILIES[t].description}" for t in tasks) + ".",
        "",
        f"Scores on the test split ({spec.n_test} examples per task; exact match, or accuracy for "
        "multiple choice). Default merges use weight 1 and density 1 for every expert.",
        "",
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
        "| chance | " + " | ".join(f"{chance[t]:.2f}" for t in tasks)
        + f" | {sum(chance.values()) / len(tasks):.2f} |",
    ]
    for label, per_task, agg in rows:
        lines.append(f"| {label} | " + " | ".join(f"{per_task[t]:.2f}" for t in tasks) + f" | {agg:.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Build and cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zoo:
    """Paths of a built zoo (all inside `root`)."""

    root: Path
    size: str
    seed: int
    base: Path
    experts: dict[str, Path]
    multitask: Path
    tasks_yaml: Path
    task_yamls: dict[str, Path]
    data_dir: Path
    report_path: Path
    variant: ZooVariant = ZooVariant()

    @classmethod
    def at(cls, root: str | Path, size: str, seed: int, variant: ZooVariant = ZooVariant()) -> "Zoo":
        """The Zoo layout under `root` for `size` (paths only; nothing is checked)."""
        root = Path(root)
        tasks = variant.families(size)
        return cls(
            root=root, size=size, seed=seed, base=root / "base",
            experts={e: root / "experts" / e for e in variant.expert_tasks(size)}, multitask=root / "multitask",
            tasks_yaml=root / "tasks.yaml", task_yamls={t: root / "tasks" / f"{t}.yaml" for t in tasks},
            data_dir=root / "data", report_path=root / REPORT_NAME, variant=variant,
        )

    @property
    def adapters(self) -> dict[str, Path]:
        """Where each expert's LoRA counterpart lives (built on demand: ``evomerge.zoo_adapters``)."""
        return {e: self.root / "adapters" / e for e in self.experts}

    @property
    def report(self) -> str:
        """The text of zoo_report.md (the measured table)."""
        return self.report_path.read_text(encoding="utf-8")

    def tokenizer(self):
        """The zoo tokenizer, loaded from the base model directory."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base)


def default_zoo_dir(size: str = "small", seed: int = 0, variant: ZooVariant = ZooVariant()) -> Path:
    """Cache directory of a zoo: $EVOMERGE_CACHE/zoo/<size><variant tag>-seed<seed>, else ~/.cache/evomerge/..."""
    zoo_size(size)
    if os.environ.get("EVOMERGE_CACHE"):
        cache = Path(os.environ["EVOMERGE_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "evomerge"
    return cache / "zoo" / f"{size}{variant.tag(size)}-seed{seed}"


def _marker(size: str, seed: int, variant: ZooVariant = ZooVariant()) -> dict[str, Any]:
    """The build parameters the marker records; a cached zoo is reused only if all of them match.

    A default variant records no ``variant`` key, so size's own zoo keeps the marker it always had."""
    spec = json.loads(json.dumps(asdict(variant.spec(size))))
    marker = {"version": ZOO_VERSION, "size": size, "seed": seed, "spec": spec}
    if not variant.is_default(size):
        marker["variant"] = asdict(variant)
    return marker


def load_zoo(root: str | Path) -> Zoo | None:
    """The complete zoo at `root` (its marker file read back), or None if there is none."""
    marker = Path(root) / MARKER_NAME
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        size, seed = info["size"], int(info["seed"])
        variant = ZooVariant(**info.get("variant", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(size, str) or size not in SIZES or not _is_complete(Path(root), size, seed, variant):
        return None
    return Zoo.at(root, size, seed, variant)


def _is_complete(root: Path, size: str, seed: int, variant: ZooVariant = ZooVariant()) -> bool:
    """Whether `root` holds a complete zoo built with these parameters and this zoo version."""
    try:
        info = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _marker(size, seed, variant)
    return (isinstance(info, dict) and all(info.get(k) == v for k, v in expected.items())
            and ("variant" in info) == ("variant" in expected))


def _check_replaceable(root: Path) -> None:
    """Raise unless `root` is a directory holding nothing but zoo parts (so it may be replaced)."""
    if root.is_symlink() or not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not an evomerge zoo directory; choose another output directory")
    foreign = sorted(p.name for p in root.iterdir()  # (a staging directory of the adapters left by a killed build)
                     if p.name not in _ZOO_ENTRIES and not p.name.startswith(".adapters."))
    if foreign:
        raise FileExistsError(
            f"{root}: not an evomerge zoo (it holds {', '.join(foreign[:5])}); "
            "refusing to replace it; choose another output directory"
        )


def _remove_old_zoo(root: Path) -> None:
    """Delete a previous (incomplete, stale or forced) zoo, after checking that it is one."""
    _check_replaceable(root)
    shutil.rmtree(root)


def build_zoo(
    out_dir: str | Path | None = None,
    size: str = "small",
    seed: int = 0,
    force: bool = False,
    progress: bool | Callable[[str], None] = True,
    variant: ZooVariant = ZooVariant(),
) -> Zoo:
    """Build the demo zoo at `out_dir` (default: `default_zoo_dir(size, seed)`), or reuse it.

    A complete zoo with the same size, seed and zoo version is returned at once (unless
    `force`). Otherwise everything is built in a temporary sibling directory that is renamed into
    place at the end, so an interrupted build leaves nothing behind (and an old zoo untouched
    until the new one is complete). `progress`: True prints to stderr, a callable receives each line.
    """
    zoo_size(size)
    variant.check(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"zoo seed must be a non-negative integer, got {seed!r}")
    root = Path(out_dir).expanduser() if out_dir is not None else default_zoo_dir(size, seed, variant)
    if not force and _is_complete(root, size, seed, variant):
        return Zoo.at(root, size, seed, variant)
    if root.exists() or root.is_symlink():
        _check_replaceable(root)
    log = progress if callable(progress) else (_stderr if progress else None)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, "building")
    try:
        start = time.perf_counter()
        with Deterministic():
            _build_into(tmp, size, seed, variant, log or (lambda _: None))
        seconds = time.perf_counter() - start
        if log:
            log(f"[zoo] built in {seconds:.0f} s")
        if not force and _is_complete(root, size, seed, variant):  # another process finished first
            shutil.rmtree(tmp)
            return Zoo.at(root, size, seed, variant)
        if root.exists():
            _remove_old_zoo(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.at(root, size, seed, variant)


def _stderr(line: str) -> None:
    """Print a progress line to stderr."""
    print(line, file=sys.stderr, flush=True)


def _save(model, tok, path: Path, dtype: str) -> None:
    """Save a (float32-trained) zoo model in the zoo's dtype."""
    save_model(model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype)), tok, path)


def _build_into(root: Path, size: str, seed: int, variant: ZooVariant, log: Callable[[str], None]) -> Zoo:
    """Build every part of the zoo into `root`; the marker file is written last."""
    start = time.perf_counter()
    spec = variant.spec(size)
    zoo = Zoo.at(root, size, seed, variant)
    tok = zoo_tokenizer()
    log(f"[zoo] building the {size}{variant.tag(size)} zoo (seed {seed}) in {root}")
    data = make_zoo_data(size, seed, variant)
    write_zoo_data(data, root)

    def timed(label, fn):
        t = time.perf_counter()
        log(f"[zoo] {label}")
        out = fn()
        log(f"[zoo]   done in {time.perf_counter() - t:.1f} s")
        return out

    base = timed(f"base: {spec.base_steps} steps of generic text + {spec.base_task_share:.0%} task examples",
                 lambda: train_base(size, seed, tok, data, log=log, variant=variant))
    _save(base, tok, zoo.base, variant.dtype)
    for name, tasks in variant.expert_tasks(size).items():
        expert = timed(f"expert {name}: {spec.expert_steps} steps",
                       lambda: finetune(base, list(tasks), size, seed, tok, data, log=log, steps=spec.expert_steps))
        _save(expert, tok, zoo.experts[name], variant.dtype)
    multi = timed(f"multitask: {spec.multitask_steps} steps on {', '.join(spec.families)}",
                  lambda: finetune(base, list(spec.families), size, seed, tok, data, log=log,
                                   steps=spec.multitask_steps))
    _save(multi, tok, zoo.multitask, variant.dtype)
    log("[zoo] test-split scores:")
    rows = measure_zoo(zoo, "test", log=log)
    seconds = time.perf_counter() - start
    zoo.report_path.write_text(render_report(zoo, rows, seconds), encoding="utf-8")
    marker = {**_marker(size, seed, variant), "families": list(spec.families), "seconds": round(seconds, 1),
              "scores": {label: {"per_task": pt, "mean": agg} for label, pt, agg in rows}}
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return zoo

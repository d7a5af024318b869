"""A short, targeted fine-tune of a merged model: a few steps on local examples, chosen tensors only.

Which tensors train is chosen by name patterns (``fnmatch``, e.g. ``*.mlp.*``) and an optional
layer range ``[start, end)``; everything else is frozen. The loss is the causal-LM loss on the
target tokens only (prompt tokens are masked), on each task's ``train`` split where its task YAML
gives one (the demo zoo's tasks do: the examples its models were trained on), else on its
``search`` split; never on ``validation`` or ``test``. Test scores are reported before and after,
and the result is written atomically as a Hugging Face checkpoint with ``finetune_report.md`` (what
was trained, on what, the losses and the test table) beside the weights.
"""

from __future__ import annotations

import fnmatch
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from evomerge.checkpoint import staged
from evomerge.engine import LAYER_PATTERN, resolve_device


REPORT_NAME = "finetune_report.md"


@dataclass
class FinetuneResult:
    trainable: list[str]
    n_params: int  # trainable parameters
    sources: dict[str, str]  # task -> the split it trained on
    losses: list[float]
    before: object  # EvalResult on the test split
    after: object
    seconds: float
    out_dir: Path | None


def select_trainable(names: Sequence[str], patterns: Sequence[str], layers: tuple[int, int] | None) -> list[str]:
    """Parameter names matching any pattern and, with ``layers``, belonging to a layer in [start, end)."""
    chosen = []
    for name in names:
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if layers is not None:
            m = LAYER_PATTERN.match(name)
            if m is None or not layers[0] <= int(m.group("index")) < layers[1]:
                continue
        chosen.append(name)
    return chosen


def training_pairs(tasks) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(prompt, target) pairs of every native task's ``train`` split, or its ``search`` split where it has
    none (multiple choice trains on the gold choice), and {task: the split used}."""
    pairs, sources = [], {}
    for spec in tasks:
        if not hasattr(spec, "examples"):
            continue  # lm-eval tasks carry no local training examples
        split = "train" if spec.has_split("train") else "search"
        sources[spec.name] = split
        for ex in spec.examples(split):
            pairs.append((ex.prompt, ex.continuations[ex.label]))
    if not pairs:
        raise ValueError("no training examples: no task has native examples in a train or search split")
    return pairs, sources


def _batch(tokenizer, pairs: Sequence[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    rows, labels = [], []
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return ids.to(device), mask.to(device), lab.to(device)


def finetune(model, tokenizer, pairs: Sequence[tuple[str, str]], *, trainable: Sequence[str], steps: int,
             lr: float, batch_size: int, seed: int = 0) -> list[float]:
    """AdamW on the ``trainable`` parameters only, ``steps`` mini-batches; returns the loss per step."""
    if not trainable:
        raise ValueError("no parameter matches the finetune selection (train patterns / layers)")
    params = dict(model.named_parameters())
    chosen = set(trainable)
    for name, p in params.items():
        p.requires_grad_(name in chosen)
    opt = torch.optim.AdamW([params[n] for n in trainable], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in range(steps):
        batch = rng.sample(list(pairs), min(batch_size, len(pairs)))
        ids, mask, labels = _batch(tokenizer, batch, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"finetune loss became {loss.item()} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    return losses


def finetune_and_report(model_dir: str | Path, out_dir: str | Path | None, cfg, *, tasks, device="auto",
                        batch_size: int = 32, log: Callable[[str], None] = print,
                        overwrite: bool = True) -> FinetuneResult:
    """Fine-tune ``model_dir`` as ``cfg`` (a config ``Finetune``) says; report test scores before/after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator, load_tasks

    t0 = time.perf_counter()
    dev = resolve_device(device)
    specs = load_tasks(cfg.data) if getattr(cfg, "data", None) else tasks
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    test = Evaluator(specs, tokenizer, split="test", batch_size=batch_size, device=dev)
    before = test.evaluate(model)
    trainable = select_trainable([n for n, _ in model.named_parameters()], cfg.train, cfg.layers)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
    pairs, sources = training_pairs(specs)
    log(f"fine-tuning {len(trainable)} tensors ({n_params / 1e6:.2f}M parameters) for {cfg.steps} steps on "
        f"{len(pairs)} examples (" + ", ".join(f"{t}: {s}" for t, s in sources.items()) + ")")
    losses = finetune(model, tokenizer, pairs, trainable=trainable, steps=cfg.steps,
                      lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    after = test.evaluate(model)
    log(f"test aggregate before {before.aggregate:.4f} -> after {after.aggregate:.4f} "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    result = FinetuneResult(trainable, n_params, sources, losses, before, after, time.perf_counter() - t0, None)
    if out_dir is not None:
        result.out_dir = _save_atomic(model, tokenizer, Path(out_dir), overwrite=overwrite,
                                      report=render_report(result, cfg, Path(model_dir)),
                                      card=finetune_card(result, cfg, Path(model_dir), specs))
    return result


def finetune_card(res: FinetuneResult, cfg, model_dir: Path, specs) -> str:
    """The fine-tuned checkpoint's model card: where it started, what trained on what, test before/after."""
    from evomerge.card import ScoreRow, finetune_facts, render_card, task_metrics

    layers = "" if cfg.layers is None else f", layers [{cfg.layers[0]}, {cfg.layers[1]})"
    how = [f"Fine-tuned from `{model_dir}` with `evomerge finetune`: {cfg.steps} AdamW steps (lr {cfg.lr:g}, "
           f"batch {cfg.batch_size}, seed {cfg.seed}) on {len(res.trainable)} tensors matching "
           f"{', '.join(f'`{p}`' for p in cfg.train)}{layers} ({res.n_params:,} parameters); everything else "
           "frozen. Training examples: " + ", ".join(f"{t} ({s} split)" for t, s in res.sources.items())
           + "; never the validation or test split. Details: `finetune_report.md`."]
    rows = [ScoreRow(label, r.aggregate, r.ci, dict(r.per_task)) for label, r in
            (("after fine-tuning (this model)", res.after), ("before fine-tuning", res.before))]
    return render_card(finetune_facts(model_dir, title=f"{model_dir.name} (fine-tuned)", how=how,
                                      before=rows[1], after=rows[0], metrics=task_metrics(specs)))


def render_report(res: FinetuneResult, cfg, model_dir: Path) -> str:
    """Markdown: what was trained, on which split of each task, the losses, and the test table before/after."""
    tasks = list(res.before.per_task)
    layers = "" if cfg.layers is None else f", layers [{cfg.layers[0]}, {cfg.layers[1]})"
    lines = [f"# Fine-tune of {model_dir}", "",
             f"{cfg.steps} AdamW steps (lr {cfg.lr:g}, batch {cfg.batch_size}, seed {cfg.seed}) on "
             f"{len(res.trainable)} tensors matching {', '.join(f'`{p}`' for p in cfg.train)}{layers}: "
             f"{res.n_params:,} parameters; everything else frozen.",
             "Training examples: " + ", ".join(f"{t} ({s} split)" for t, s in res.sources.items()) + ".",
             f"Loss {res.losses[0]:.4f} at the first step, {res.losses[-1]:.4f} at the last; {res.seconds:.1f} s "
             "in all.", "", "## Test split", "",
             "| model | aggregate | 95% CI | " + " | ".join(tasks) + " |", "|---|---:|---|" + "---:|" * len(tasks)]
    for label, r in (("before", res.before), ("after", res.after)):
        ci = "" if r.ci is None else f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
        lines.append(f"| {label} | {r.aggregate:.3f} | {ci} | "
                     + " | ".join(f"{r.per_task[t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def _save_atomic(model, tokenizer, out: Path, overwrite: bool, report: str | None = None,
                 card: str | None = None) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(report)
        if card is not None:
            (tmp / "README.md").write_text(card)
    return out

"""The demo zoo's LoRA experts: one PEFT LoRA adapter per expert, trained on the zoo's base.

Each adapter sees what its full fine-tune expert sees (the expert's task families plus the zoo's
generic replay) through the zoo's one training loop (``evomerge.zoo.train_lm``, AdamW with warm-up
and decay), with only the LoRA factors trainable: rank ``ADAPTER_SPECS[size].rank`` on every attention
and MLP projection, factors initialised by PEFT from a seed derived from the zoo seed. Deterministic
like the rest of the zoo (one thread, deterministic algorithms).

Adapters are built on demand into ``<zoo>/adapters/<expert>/`` (PEFT's ``adapter_config.json`` +
``adapter_model.safetensors``), not by :func:`evomerge.zoo.build_zoo` itself: a zoo cached before
adapters existed keeps its (minutes-long) models and only gains the adapters, and the tiny zoo the tests
share stays as fast to build as before. ``evomerge zoo build`` builds them by default
(``--no-adapters``: not); a run config with ``zoo: {adapters: true}`` builds them before searching.
The directory is written in a staging directory and renamed into place; ``adapters.json``, written
last, records the build parameters and the test-split scores of the base and of every adapter.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from evomerge.checkpoint import staged
from evomerge.zoo import (Deterministic, Zoo, derived_seed, finetune_examples, make_zoo_data, train_lm,
                          zoo_tokenizer)

ADAPTERS_VERSION = 1  # bump when the adapters' training changes what a build produces
MARKER_NAME = "adapters.json"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """LoRA shape and training schedule of a zoo size's adapters."""

    rank: int
    alpha: int
    steps: int
    lr: float
    batch_size: int = 32


ADAPTER_SPECS: dict[str, AdapterSpec] = {
    "tiny": AdapterSpec(rank=8, alpha=16, steps=150, lr=3e-3),
    "small": AdapterSpec(rank=8, alpha=16, steps=300, lr=2e-3),
}


def _marker(zoo: Zoo) -> dict:
    """The build parameters the adapters' marker records; cached adapters are reused only if all match."""
    return {"version": ADAPTERS_VERSION, "size": zoo.size, "seed": zoo.seed, "experts": sorted(zoo.experts),
            "spec": asdict(ADAPTER_SPECS[zoo.size]), "target_modules": list(TARGET_MODULES)}


def adapters_complete(zoo: Zoo) -> bool:
    """Whether the zoo holds every adapter, built with the current parameters."""
    try:
        info = json.loads((zoo.root / "adapters" / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and all(info.get(k) == v for k, v in _marker(zoo).items())
            and all((p / "adapter_model.safetensors").is_file() for p in zoo.adapters.values()))


def train_adapter(base_model, tasks: list[str], zoo: Zoo, tokenizer, data, log=None):
    """A PEFT LoRA model over a copy of ``base_model``, trained on ``tasks`` as the zoo's experts are."""
    from peft import LoraConfig, get_peft_model

    spec = ADAPTER_SPECS[zoo.size]
    label = "+".join(tasks)
    with Deterministic():
        torch.manual_seed(derived_seed(zoo.seed, f"lora-init-{label}"))  # PEFT draws A from torch's generator
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                            target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
        model = get_peft_model(copy.deepcopy(base_model), config)
        examples = finetune_examples(tokenizer, zoo.variant.spec(zoo.size), zoo.seed, data, tasks)
        train_lm(model, examples, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
                 seed=derived_seed(zoo.seed, f"lora-{label}"), pad_id=tokenizer.pad_token_id, log=log)
    return model


def build_adapters(zoo: Zoo, force: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Train and save the zoo's LoRA experts (unless complete ones are there); returns {expert: adapter dir}."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate import Evaluator

    if not force and adapters_complete(zoo):
        return zoo.adapters
    log = log or (lambda _: None)
    spec = ADAPTER_SPECS[zoo.size]
    start = time.perf_counter()
    tok = zoo_tokenizer()
    data = make_zoo_data(zoo.size, zoo.seed, zoo.variant)
    base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    test = Evaluator(zoo.tasks_yaml, tok, split="test", batch_size=64, bootstrap_iters=0)
    scores = {}
    with Deterministic():
        scores["base"] = dict(test.evaluate(base).per_task)
    with staged(zoo.root / "adapters", "building") as tmp:
        for name, tasks in zoo.variant.expert_tasks(zoo.size).items():
            t0 = time.perf_counter()
            log(f"[zoo] LoRA adapter {name}: rank {spec.rank}, {spec.steps} steps")
            model = train_adapter(base, list(tasks), zoo, tok, data, log=log)
            with Deterministic():
                scores[name] = dict(test.evaluate(model).per_task)
            model.save_pretrained(tmp / name)
            log(f"[zoo]   done in {time.perf_counter() - t0:.1f} s; test "
                + "  ".join(f"{t} {scores[name][t]:.2f} (base {scores['base'][t]:.2f})" for t in tasks))
        marker = {**_marker(zoo), "seconds": round(time.perf_counter() - start, 1), "test_scores": scores}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return zoo.adapters

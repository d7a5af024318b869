"""Candidates of a linear merge of LoRA adapters as scalings of one live PEFT model: nothing dense is built.

With every adapter loaded into one ``PeftModel`` and all of them active, a LoRA layer computes
W·x + Σᵢ sᵢ'·Bᵢ·Aᵢ·x, where sᵢ' is its per-adapter ``scaling``. A ``linear`` or ``task_arithmetic``
recipe (no sparsification) over adapters gives each module the weight W + Σᵢ cᵢ·sᵢ·Bᵢ·Aᵢ, so setting
sᵢ' = cᵢ·sᵢ (cᵢ: the coefficient the method gives adapter i for that tensor, per-layer gradients and
filters included; see :func:`evomerge.lora.export.coefficients`) makes the live model that merge,
in delta semantics (LoraHub, Huang et al. 2023, arXiv:2307.13269, searches these coefficients; it
composes the factors instead, which adds cross terms). A candidate costs a plan and one float
per module and adapter.

:class:`ScalingBuilder` has the candidate builder's interface (``build``, ``model``, ``params``,
``load_model_weights``, ...), so ``evomerge search`` uses it with ``lora_scalings: true`` in the
run config. Anything written into ``params`` (a baseline merged by the engine, a full model's
weights) switches the adapters off until the next ``build``, which first restores the base weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import all_finite, plan_merge, resolve_device
from evomerge.lora.adapter import AdapterError, is_adapter_dir
from evomerge.lora.export import coefficients, is_linear_combination
from evomerge.lora.source import AdapterReader
from evomerge.recipe import Recipe

def plain_lora_problems(reader: AdapterReader) -> list[str]:
    """Why an adapter cannot be scaled as a whole (DoRA, lora_bias, tensors saved whole); empty if it can."""
    problems = [f"{reader.path}: module {m.name}: DoRA, lora_bias or a tensor saved whole changes it, which a "
                f"scaling cannot vary" for m in reader.adapter.modules.values() if reader.module_of(m.weight) is None]
    weights = {m.weight for m in reader.adapter.modules.values()}
    stray = [n for n in reader.adapter.full if n not in weights]
    if stray:
        problems.append(f"{reader.path}: tensors saved whole ({', '.join(stray[:3])}; modules_to_save or trained "
                        f"biases) cannot be scaled")
    return problems


class _DenseWrites(Mapping):
    """The base weights by tensor name; reading an entry (to write it) switches the adapters off first."""

    def __init__(self, builder: "ScalingBuilder", params: dict[str, torch.Tensor]):
        self.builder, self.params = builder, params

    def __getitem__(self, name: str) -> torch.Tensor:
        self.builder._dense_mode()
        return self.params[name]

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, name) -> bool:
        return name in self.params


class ScalingBuilder:
    """The candidate-builder interface over one PEFT model holding every adapter (see the module doc)."""

    def __init__(self, base_dir: str | Path, models: dict[str, str | Path], *, method: str,
                 device: str | torch.device = "auto", dtype: str = "float32", seed: int = 0,
                 statistics_cache: str | Path | None = None):
        """The arguments of ``CandidateBuilder`` (``statistics_cache`` is unused: linear merges need no data)."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        from evomerge.search.builder import DTYPES

        if method not in ("linear", "task_arithmetic"):
            raise ValueError(f"lora_scalings: method {method} is not a linear combination of the adapters; use "
                             f"task_arithmetic or linear")
        self.device = resolve_device(device)
        self.method, self.seed = method, seed
        self.base_dir = str(base_dir)
        base = ModelReader(base_dir)
        self.readers: dict[str, object] = {self.base_dir: base}
        self.model_paths = {name: str(p) for name, p in models.items()}
        self._path_of: dict[int, str] = {}  # id(adapter reader) -> its path
        problems = []
        for name, p in self.model_paths.items():
            if not is_adapter_dir(p):
                raise AdapterError(f"lora_scalings: model '{name}' ({p}) is not a LoRA adapter directory")
            reader = AdapterReader(base, p)
            self.readers[p] = reader
            self._path_of[id(reader)] = p
            problems += plain_lora_problems(reader)
            tied = sorted({m.weight for m in reader.adapter.modules.values()} & set(base.tied_aliases.values()))
            if tied:  # unmerged, PEFT would change the input embeddings but not the tied output layer
                problems.append(f"{p}: module {tied[0]} is tied to the output embeddings; a scaling would change "
                                f"only one of them")
        if problems:
            raise AdapterError("\n".join(problems))
        self.adapter_names = {p: f"adapter{i}" for i, p in enumerate(self.model_paths.values())}
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype])
        paths = list(self.adapter_names)
        peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name=self.adapter_names[paths[0]])
        for p in paths[1:]:
            peft_model.load_adapter(p, adapter_name=self.adapter_names[p])
        peft_model.base_model.set_adapter(list(self.adapter_names.values()))
        self.model = peft_model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = {name: m for name, m in self.model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
        self._native = {name: dict(layer.scaling) for name, layer in self.layers.items()}  # sᵢ per adapter
        self._params = self._base_params()
        self.params = _DenseWrites(self, self._params)
        self._dirty = False  # base weights overwritten through ``params``
        self.num_layers = base.num_layers
        self.tokenizer_dir = Path(base_dir)

    def _base_params(self) -> dict[str, torch.Tensor]:
        """The live model's base weights by the base model's tensor names (LoRA layers' ``base_layer`` included)."""
        out = {}
        for name, p in self.model.base_model.model.named_parameters():
            if "lora_" in name:
                continue
            out[name.replace(".base_layer.", ".")] = p
        return out

    # -- candidates -------------------------------------------------------------------------------
    def set_scalings(self, scalings: Mapping[str, Mapping[str, float]]) -> None:
        """Set every LoRA layer's per-adapter scaling (``scalings[module][adapter path]``; absent: 0)."""
        for name, layer in self.layers.items():
            given = scalings.get(name, {})
            for path, adapter in self.adapter_names.items():
                if adapter in layer.scaling:
                    layer.scaling[adapter] = float(given.get(path, 0.0))

    def scalings_for(self, recipe: Recipe) -> dict[str, dict[str, float]]:
        """Per LoRA module and adapter path, cᵢ·sᵢ for ``recipe`` (a linear combination, checked)."""
        plan = plan_merge(recipe, readers=self.readers)
        if not is_linear_combination(plan):
            raise ValueError(f"lora_scalings: recipe {recipe.name or ''} is not a linear combination of the adapters "
                             f"(method {plan.method.name}, or density < 1)")
        out: dict[str, dict[str, float]] = {}
        for task in plan.tasks:
            readers = [plan.readers[ref.model] for ref in task.inputs]
            if not any(isinstance(r, AdapterReader) and r.changes(ref.name) for ref, r in zip(task.inputs, readers)):
                continue
            for c, ref, reader in zip(coefficients(task, plan.method.name), task.inputs, readers):
                module = reader.module_of(ref.name) if isinstance(reader, AdapterReader) else None
                if module is not None:  # the recipe may name the adapter as a path or as base+path
                    path = self._path_of[id(reader)]
                    out.setdefault(module.name, {})[path] = c * self._native[module.name][self.adapter_names[path]]
        return out

    @torch.inference_mode()
    def build(self, recipe: Recipe):
        """Make the live model the merge of ``recipe`` by setting scalings (restoring the base weights if needed)."""
        from evomerge.search.builder import BuildStats

        stats = BuildStats()
        t0 = time.perf_counter()
        scalings = self.scalings_for(recipe)
        stats.plan = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._restore_base()
        self.set_scalings(scalings)
        stats.merge = time.perf_counter() - t1
        stats.tensors = len(scalings)
        return stats

    def _dense_mode(self) -> None:
        """Adapters off: the caller is about to write full weights into the base parameters."""
        self.set_scalings({})
        self._dirty = True

    @torch.inference_mode()
    def _restore_base(self) -> None:
        if not self._dirty:
            return
        base = self.readers[self.base_dir]
        for name, p in self._params.items():
            if base.has_tensor(name) or name in base.tied_aliases:
                p.copy_(base.get_tensor(base.resolve_tied(name)).to(p.device, p.dtype))
        self._dirty = False

    @torch.inference_mode()
    def load_model_weights(self, path: str | None) -> None:
        """The base (None), one adapter alone (its own scalings), or a full model's weights."""
        self._restore_base()
        if path is None:
            self.set_scalings({})
        elif path in self.adapter_names:
            adapter = self.adapter_names[path]
            self.set_scalings({name: {path: s[adapter]} for name, s in self._native.items() if adapter in s})
        else:
            reader = self.readers[path]
            for name in self.params:
                if reader.has_tensor(name) or name in getattr(reader, "tied_aliases", {}):
                    self.params[name].copy_(reader.get_tensor(reader.resolve_tied(name)).to(self.device))

    def precompute(self) -> float:
        return 0.0

    def nonfinite_tensor(self) -> str | None:
        """A LoRA module with a non-finite scaling, or a non-finite base parameter (None: all finite)."""
        for name, layer in self.layers.items():
            if not all(torch.isfinite(torch.tensor(float(s))) for s in layer.scaling.values()):
                return name
        return next((n for n, p in self._params.items() if not all_finite(p)), None)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


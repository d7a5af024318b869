"""The data-flow candidate builder: a ``slices:`` + ``passthrough`` recipe as a live model over resident layers.

Loaded once: every source model (the base and each fine-tune a data-flow space may draw from), resident
on the device in the run's dtype. A candidate is a new model object whose parameters *are* the sources'
parameters: nothing is copied for a layer used as it is, and a layer used twice shares its tensors. Only
a scaled step (passthrough's ``scale`` on its output projections) gets tensors of its own, computed by
the merge method's own kernel, as ``evomerge merge`` computes them.

The candidate is planned with the engine's planner (``plan_merge``, headers only), so which tensor of
which model lands where, and the output config (layer count, per-layer ``layer_types`` following each
layer's origin), are exactly those of ``evomerge merge``. The model is built from that config on the
meta device, so the architecture's constructor sets every per-layer attribute for the new positions
(``layer_idx`` for the KV cache, attention kind and sliding window), then each parameter is bound to its
resident tensor; buffers (the rotary embedding's frequencies) are the base model's. The live model's
logits equal, bit for bit, those of the checkpoint ``evomerge merge`` writes from the recipe (tests
check Llama and Qwen2, with scaled and repeated layers).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import MergeError, MergePlan, all_finite, plan_merge, resolve_device
from evomerge.recipe import Recipe
from evomerge.search.builder import DTYPES, BuildStats


class DataflowBuilder:
    """Builds data-flow candidates (``slices:`` passthrough recipes) over resident source models."""

    def __init__(self, base_dir: str | Path, sources: dict[str, str | Path], *, device="auto",
                 dtype: str = "float32"):
        """``sources``: name -> model directory of every model a flow may use (the base is always loaded)."""
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.base_dir = str(base_dir)
        paths = list(dict.fromkeys([self.base_dir, *(str(p) for p in sources.values())]))
        self.readers = {p: ModelReader(p) for p in paths}  # headers: what plan_merge reads
        self.resident: dict[str, torch.nn.Module] = {}
        for p in paths:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=self.dtype).eval().to(self.device)
            for name, tensor in model.state_dict().items():
                if not all_finite(tensor):
                    raise MergeError(f"model '{p}': tensor {name} contains NaN or infinite values")
            self.resident[p] = model
        self.tensors = {p: m.state_dict(keep_vars=True) for p, m in self.resident.items()}
        self.base = self.resident[self.base_dir]
        self.model: torch.nn.Module = self.base
        self.num_layers = self.readers[self.base_dir].num_layers
        self.tokenizer_dir = Path(base_dir)
        self._scaled: list[tuple[str, torch.Tensor]] = []  # the current candidate's own tensors

    def precompute(self) -> float:
        """Nothing to precompute: a candidate is a re-arrangement of resident tensors."""
        return 0.0

    def plan(self, recipe: Recipe) -> MergePlan:
        """The engine's plan of a recipe over the resident models' headers."""
        missing = [m for m in recipe.referenced_models() if m not in self.readers]
        if missing:
            raise MergeError(f"recipe uses model(s) {missing} that this builder does not hold")
        return plan_merge(recipe, readers=self.readers)

    def build(self, recipe: Recipe) -> BuildStats:
        """Make ``recipe``'s model the live ``self.model``."""
        t0 = time.perf_counter()
        plan = self.plan(recipe)
        t1 = time.perf_counter()
        self.model = self.assemble(plan)
        return BuildStats(plan=t1 - t0, merge=time.perf_counter() - t1, tensors=len(plan.tasks),
                          extra={"scaled_tensors": len(self._scaled)})

    def assemble(self, plan: MergePlan) -> torch.nn.Module:
        """A new model object for ``plan``: its config, the sources' tensors bound in place, scaled steps
        computed by the method's kernel."""
        if plan.method.name != "passthrough":
            raise MergeError(f"a data-flow candidate is a passthrough recipe, got merge_method {plan.method.name}")
        config = type(self.base.config).from_dict(dict(plan.config))
        with torch.device("meta"):
            model = type(self.base)(config)
        model.eval()
        self._scaled = []
        bound = set()
        for task in plan.tasks:
            ref = task.inputs[0]
            tensor = self.tensors[ref.model][ref.name]
            scale = task.model_params[0].get("scale", 1.0) if task.model_params else 1.0
            if task.method != "copy" and scale != 1.0:
                value = plan.method.merge(base=None, tensors=[tensor.detach()], model_params=task.model_params,
                                          params=task.params).to(self.dtype)
                if not all_finite(value):
                    raise MergeError(f"scaled tensor {task.name} contains NaN or infinite values (scale {scale})")
                tensor = torch.nn.Parameter(value, requires_grad=False)
                self._scaled.append((task.name, tensor))
            _bind(model, task.name, tensor)
            bound.add(task.name)
        for name, param in model.named_parameters(remove_duplicate=False):
            if param.is_meta:
                out_emb = model.get_output_embeddings()
                if getattr(config, "tie_word_embeddings", False) and out_emb is not None and param is out_emb.weight:
                    _bind(model, name, model.get_input_embeddings().weight)
                    continue
                raise MergeError(f"the recipe gives no tensor for {name}")
        base_buffers = dict(self.base.named_buffers())
        for name, buf in list(model.named_buffers()):
            if buf.is_meta:
                if name not in base_buffers:
                    raise MergeError(f"buffer {name} of the candidate has no counterpart in the base model")
                _bind(model, name, base_buffers[name], buffer=True)
        model.generation_config = self.base.generation_config
        return model

    def load_model_weights(self, path: str | None) -> None:
        """Make a whole model live: the base (None), a resident source, or any other directory (loaded)."""
        from transformers import AutoModelForCausalLM

        path = self.base_dir if path is None else str(path)
        if path not in self.resident:
            self.readers.setdefault(path, ModelReader(path))
            self.resident[path] = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).eval().to(self.device)
            self.tensors[path] = self.resident[path].state_dict(keep_vars=True)
        self.model = self.resident[path]

    def nonfinite_tensor(self) -> str | None:
        """The first of the current candidate's own (scaled) tensors holding NaN or infinity (sources were
        checked when loaded), else None."""
        for name, tensor in self._scaled:
            if not all_finite(tensor):
                return name
        return None

    def close(self) -> None:
        self.resident.clear()
        self.tensors.clear()
        self.model = None


def _bind(model: torch.nn.Module, name: str, tensor: torch.Tensor, buffer: bool = False) -> None:
    """Point ``model``'s parameter (or buffer) ``name`` at ``tensor`` itself, without copying it."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if buffer:
        owner._buffers[attr] = tensor
    elif attr in owner._parameters:
        owner._parameters[attr] = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
            tensor, requires_grad=False)
    else:
        raise MergeError(f"the candidate model has no parameter {name}")

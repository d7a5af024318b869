"""The backend interface: how a candidate recipe is merged into one resident model.

A backend loads once what every candidate of one method needs (the base model, live and
resident on a device, and the inputs of every tensor, in float32; for the task-arithmetic family
the task vectors δᵢ = xᵢ − base), checks before loading that it fits (``resident_bytes``), and
then writes each candidate into the live model's parameters in place (``build``), bit for bit
what ``evomerge merge`` writes from the same recipe and seed. In the spirit of Optuna's
``BaseSampler``: a few abstract methods, the rest shared.

- ``prepare()``: precompute the order statistics, ranks and random fields the method needs
  (otherwise done lazily by the first candidate);
- ``build(recipe, stats)``: the candidate into the live model;
- ``resident_bytes(sizes, rows)``: what it holds on its device for a model of these tensors.

Implementations: ``reference`` (tensor by tensor through ``evomerge.methods``, every method),
``cpu`` (one compiled numba pass over flat buffers, the task-arithmetic family) and ``cuda``
(fused Triton kernels over flat buffers, the task-arithmetic family).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import MergeError, MergePlan, all_finite, plan_merge
from evomerge.lora import open_source
from evomerge.methods.l1 import L1_BLOCK
from evomerge.methods.task_arithmetic import VARIANTS
from evomerge.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BuildStats:
    """Where a candidate's build time went (seconds)."""

    plan: float = 0.0
    merge: float = 0.0
    precompute: float = 0.0
    tensors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.plan + self.merge


class Backend(ABC):
    """Merges candidates of one method into a resident model (see the module docstring)."""

    name: ClassVar[str]
    FLAT: ClassVar[bool] = False  # every input one flat buffer, a segment per tensor; parameters views of the output
    ALIGNED: ClassVar[bool] = False  # each segment from a multiple of L1_BLOCK (its L1 blocks are whole rows)

    def __init__(self, base_dir: str | Path, models: dict[str, str | Path], *, method: str,
                 device: torch.device, dtype: str = "float32", seed: int = 0,
                 statistics_cache: str | Path | None = None):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.seed = seed
        self.method = method
        self.statistics_cache = statistics_cache
        self._statistics: dict[str, dict] = {}  # calibration settings (JSON) -> per model statistics
        self.variant = VARIANTS.get(method)
        self.base_dir = str(base_dir)
        self.model_paths = {name: str(p) for name, p in models.items()}
        self.readers = {self.base_dir: ModelReader(base_dir)}
        for p in self.model_paths.values():  # a LoRA adapter directory reads as base + ΔW (evomerge.lora)
            self.readers[p] = open_source(p, base=self.readers[self.base_dir])
        self.model_dtype = DTYPES[dtype]
        self.check_memory()
        # the flat backends move the model to the device only once its parameters are views of their output
        # buffer (``FlatBackend.setup_segments``): moved first, its own parameters would sit beside the buffers
        # until replaced, a peak of one more model (14 GB for a bf16 7B) that no memory check counts
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=self.model_dtype).eval()
        if not self.FLAT:
            self.model.to(self.device)
        self.params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self.tokenizer_dir = Path(base_dir)
        self.num_layers = self.readers[self.base_dir].num_layers
        t0 = time.perf_counter()
        total = self._load_inputs()
        self.load_seconds = time.perf_counter() - t0
        self.setup(total)

    # -- the interface ------------------------------------------------------------------------------
    @abstractmethod
    def resident_bytes(self, sizes: list[int], rows: list[int]) -> int:
        """Bytes held on the device for tensors of ``sizes`` elements (DELLA row lengths ``rows``)."""

    @abstractmethod
    def prepare(self) -> None:
        """Compute every order statistic / rank / field the method needs now (else lazily)."""

    @abstractmethod
    def build(self, recipe: Recipe, stats: BuildStats) -> None:
        """Write the merge of ``recipe`` into the live model's parameters, in place."""

    # -- shared -----------------------------------------------------------------------------------
    def setup(self, total: int) -> None:
        """After loading: the backend's own tables (``total``: elements of the flat buffers)."""

    def holds_bf16_inputs(self) -> bool:
        """Whether a bf16 model's fine-tunes stay bf16 (the kernels form δ = x − base)."""
        return False

    def tensor_sizes(self) -> tuple[list[int], list[int]]:
        """Element counts and DELLA row lengths of the base model's floating-point tensors, from its headers."""
        reader = self.readers[self.base_dir]
        names = [n for n in reader.tensor_names() if reader.dtype(n).is_floating_point]
        sizes = [int(np.prod(reader.shape(n), dtype=np.int64)) for n in names]
        rows = [reader.shape(n)[1] if len(reader.shape(n)) >= 2 else size for n, size in zip(names, sizes)]
        return sizes, rows

    def check_memory(self) -> None:
        """Before loading anything: on CUDA, ``check_device_memory``."""
        if self.device.type == "cuda":
            self.check_device_memory()

    def check_device_memory(self) -> None:
        """Refuse a model whose resident buffers exceed the GPU's free memory."""
        sizes, rows = self.tensor_sizes()
        k = len(self.model_paths)
        need = self.resident_bytes(sizes, rows)
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            gib = 2 ** 30
            raise MergeError(f"the candidate builder needs about {need / gib:.1f} GiB on {self.device} for "
                             f"{sum(sizes) / 1e9:.2f}B parameters and {k} fine-tune(s) ({self.method}), but "
                             f"{free / gib:.1f} GiB are free: use fewer fine-tunes, a smaller model, or "
                             f"--device cpu")

    def _load_inputs(self) -> int:
        """Read the base and every input into flat float32 buffers (a segment per tensor) with views by name."""
        base_reader = self.readers[self.base_dir]
        self.names = [n for n in base_reader.tensor_names()
                      if n in self.params and base_reader.dtype(n).is_floating_point]
        shapes = {n: tuple(base_reader.shape(n)) for n in self.names}
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for n in self.names:
            size = int(np.prod(shapes[n], dtype=np.int64))
            if self.ALIGNED:
                total = -(-total // L1_BLOCK) * L1_BLOCK
            self.offsets[n] = (total, total + size)
            total += size
        if self.ALIGNED:
            total = -(-total // L1_BLOCK) * L1_BLOCK
        # one flat float32 buffer per input, a segment per tensor; the dicts hold views into them. On the
        # cuda backend a bf16 model's fine-tunes stay bf16 (2 bytes per parameter, not 4) and the kernels
        # form δ = x − base as the engine does (``inputs16``)
        self.inputs16 = self.holds_bf16_inputs()
        alloc = torch.zeros if self.ALIGNED else torch.empty  # the gaps between aligned segments hold zeros
        self.flat_base = alloc(total, dtype=torch.float32, device=self.device)
        self.flat_inputs = alloc((len(self.model_paths), total), device=self.device,
                                 dtype=torch.bfloat16 if self.inputs16 else torch.float32)
        self.base: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, Mapping[str, torch.Tensor]] = {}
        views: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self.model_paths.values()}
        for name in self.names:
            a, e = self.offsets[name]
            b = self.flat_base[a:e].view(shapes[name])
            # inputs are read as the engine reads them for recipes of this dtype (cast to it), then held in float32
            b.copy_(base_reader.get_tensor(name, dtype=self.model_dtype))
            check_finite_input(b, self.base_dir, name)
            self.base[name] = b
            for i, p in enumerate(self.model_paths.values()):
                reader = self.readers[p]
                view = self.flat_inputs[i, a:e].view(shapes[name])
                view.copy_(reader.get_tensor(reader.resolve_tied(name), dtype=self.model_dtype))
                check_finite_input(view, p, name)  # as ``evomerge merge`` refuses them; the kernels assume it
                if self.variant:
                    delta = torch.sub(view, b) if self.inputs16 else view.sub_(b)  # the task vector δ = x − base
                    if not all_finite(delta):
                        raise MergeError(f"model '{p}': tensor {name}: its difference from the base model "
                                         f"overflows float32")
                views[p][name] = view
        for i, p in enumerate(self.model_paths.values()):
            self.inputs[p] = TaskVectors(self.flat_inputs[i], self.flat_base, self.offsets, shapes) \
                if self.inputs16 else views[p]
        return total

    def plan(self, recipe: Recipe) -> MergePlan:
        """The engine's plan of ``recipe`` against the resident models' headers."""
        return plan_merge(recipe, readers=self.readers)

    @torch.inference_mode()
    def nonfinite_tensor(self) -> str | None:
        """The name of a live parameter holding NaN or ±inf (None if all are finite)."""
        return next((n for n in self.params if not all_finite(self.params[n])), None)

    @torch.inference_mode()
    def load_model_weights(self, path: str | None) -> None:
        """Put a source model's own weights (None: the base) into the live model, from its file."""
        reader = self.readers[path or self.base_dir]
        for name, p in self.params.items():
            if reader.has_tensor(name) or name in getattr(reader, "tied_aliases", {}):
                p.copy_(reader.get_tensor(reader.resolve_tied(name)).to(p.device, p.dtype))

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA); nothing elsewhere."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Close the model files."""
        for r in self.readers.values():
            r.close()


class TaskVectors(Mapping):
    """One fine-tune's task vectors δ = x − base by tensor name, formed on access (float32, the engine's
    ``torch.sub``) from its resident bf16 values ``x`` and the float32 base, both flat."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor, offsets: dict[str, tuple[int, int]],
                 shapes: dict[str, tuple[int, ...]]):
        self.x, self.flat_base, self.offsets, self.shapes = x, base, offsets, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        a, e = self.offsets[name]
        return torch.sub(self.x[a:e], self.flat_base[a:e]).view(self.shapes[name])

    def __iter__(self):
        return iter(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)


def check_finite_input(x: torch.Tensor, model: str, name: str) -> None:
    """``evomerge merge``'s refusal of inputs with NaN or infinite values, at load time."""
    if not all_finite(x):
        raise MergeError(f"model '{model}': tensor {name} contains NaN or infinite values")

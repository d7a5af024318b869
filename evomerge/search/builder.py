"""The candidate builder: merge a recipe into one resident model, in place, without touching disk.

What a search needs from candidate building, and nothing more: a live model, ``build(recipe)``,
and the checks around it. The merging itself is a backend's (``evomerge.backends``): the
reference kernels tensor by tensor (every method), one compiled numba pass on the CPU or fused
Triton kernels on a GPU (the task-arithmetic family). Whichever runs, a candidate's tensors equal,
bit for bit, what ``evomerge merge`` writes from the exported recipe with the same seed (tests and
``benchmarks/golden.py`` check it). Everything stays resident, so a backend refuses to start, before
loading anything, where the memory cannot hold it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from evomerge.backends import BackendName, backend_class, resolve_backend
from evomerge.backends.base import DTYPES, Backend, BuildStats
from evomerge.engine import MergePlan, resolve_device
from evomerge.recipe import Recipe

__all__ = ["BuildStats", "CandidateBuilder", "DTYPES"]


class CandidateBuilder:
    """Merges candidates of one method into a resident model (see the module docstring)."""

    def __init__(self, base_dir: str | Path, models: dict[str, str | Path], *, method: str,
                 device: str | torch.device = "auto", dtype: str = "float32", seed: int = 0,
                 backend: BackendName = "auto", statistics_cache: str | Path | None = None):
        """``backend``: which backend merges the candidates ("auto": ``cpu`` on the CPU, ``cuda`` on a
        GPU with Triton, else ``reference``; see ``evomerge.backends.resolve_backend``). Data-aware
        methods (RegMean) compute their calibration statistics once per builder, cached in
        ``statistics_cache`` when given."""
        device = resolve_device(device)
        cls = backend_class(resolve_backend(backend, device, method))
        self.backend: Backend = cls(base_dir, models, method=method, device=device, dtype=dtype, seed=seed,
                                    statistics_cache=statistics_cache)

    # what the search reads of the resident model
    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def method(self) -> str:
        return self.backend.method

    @property
    def num_layers(self) -> int:
        return self.backend.num_layers

    @property
    def tokenizer_dir(self) -> Path:
        return self.backend.tokenizer_dir

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The live model's parameters by name (views of the backend's output where it has one)."""
        return self.backend.params

    @property
    def readers(self) -> dict:
        """The open model files by path (base and fine-tunes)."""
        return self.backend.readers

    @property
    def load_seconds(self) -> float:
        return self.backend.load_seconds

    def precompute(self) -> float:
        """Compute every order statistic / rank / field the method needs now (else lazily); seconds taken."""
        t0 = time.perf_counter()
        self.backend.prepare()
        return time.perf_counter() - t0

    def plan(self, recipe: Recipe) -> MergePlan:
        """The engine's plan of ``recipe`` against the resident models' headers."""
        return self.backend.plan(recipe)

    def build(self, recipe: Recipe) -> BuildStats:
        """Write the merge of ``recipe`` into the live model's parameters, in place."""
        stats = BuildStats()
        self.backend.build(recipe, stats)
        return stats

    def nonfinite_tensor(self) -> str | None:
        """The name of a live parameter holding NaN or ±inf (None if all are finite)."""
        return self.backend.nonfinite_tensor()

    def load_model_weights(self, path: str | None) -> None:
        """Put a source model's own weights (None: the base) into the live model, from its file."""
        self.backend.load_model_weights(path)

    def close(self) -> None:
        """Close the model files."""
        self.backend.close()

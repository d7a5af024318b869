"""An adapter as a merge source: the reader of base + ΔW, one tensor at a time.

:class:`AdapterReader` has the reader interface the merge engine and the candidate builder use
(``tensor_names``, ``shape``, ``dtype``, ``get_tensor``, ...): it presents the model that PEFT's
``merge_and_unload`` would produce from the adapter, without building it. Each tensor the adapter
changes is computed when asked for, from the base tensor and the adapter's factors (see
:mod:`evomerge.lora.adapter` for the formulas); every other tensor is the base model's own. Every
merge method therefore treats an adapter exactly like a full fine-tune, through the same kernels:
its task vector is ΔW.

Changed tensors are computed and returned in float32 (float64 for a float64 base) unless a dtype
is asked for, so ΔW keeps its precision when the base is stored in 16 bits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.lora.adapter import (AdapterError, LoraAdapter, LoraModule, check_against_base, is_base_layer_key,
                                   read_adapter)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool = False) -> torch.Tensor:
    """ΔW = s·B·A (transposed for embeddings and fan_in_fan_out layers), in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    delta = (b.to(dtype) @ a.to(dtype)).mul_(scale)
    return delta.T if transpose else delta


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight: each output row of W + ΔW rescaled to the stored magnitude (Liu et al. 2024)."""
    merged = weight + delta
    norm = torch.linalg.vector_norm(merged, dim=1)
    return merged.mul_((magnitude.to(merged.dtype) / norm).unsqueeze(1))


def base_names_match(declared: str | None, base_path: Path | None) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` plausibly names the base it is applied to."""
    if not declared or base_path is None:
        return True
    d = Path(declared).expanduser()
    try:
        if d.exists() and d.resolve() == base_path.resolve():
            return True
    except OSError:
        pass
    return d.name == base_path.name or declared.rstrip("/").split("/")[-1] == base_path.name


class AdapterReader:
    """The tensors of ``base`` with a LoRA adapter applied (PEFT ``merge_and_unload``), read lazily."""

    def __init__(self, base, adapter: str | Path | LoraAdapter, *, base_name: str | None = None):
        self.base = base
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else read_adapter(adapter)
        self.path = self.adapter.path
        name = base_name or str(getattr(base, "path", "<base>"))
        problems = check_against_base(self.adapter, base.shape, base.has_tensor, name)
        if problems:
            raise AdapterError("\n".join(problems))
        base_path = getattr(base, "path", None)
        if not base_names_match(self.adapter.base_model_name, Path(base_path) if base_path else None):
            warnings.warn(f"{self.path}: adapter_config.json says the adapter was trained on "
                          f"'{self.adapter.base_model_name}', but it is applied to '{name}'", stacklevel=2)
        self.config = getattr(base, "config", None)
        self.architectures = getattr(base, "architectures", [])
        self.num_layers = getattr(base, "num_layers", None)
        self.tied_aliases = getattr(base, "tied_aliases", {})
        self._weights = {m.weight: m for m in self.adapter.modules.values()}
        self._biases = {m.bias: m for m in self.adapter.modules.values() if m.bias_key}

    # -- the reader interface -----------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def has_tensor(self, name: str) -> bool:
        return self.base.has_tensor(name)

    def resolve_tied(self, name: str) -> str:
        return self.base.resolve_tied(name) if hasattr(self.base, "resolve_tied") else name

    def shape(self, name: str):
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def changes(self, name: str) -> bool:
        """True if the adapter changes the base tensor ``name``."""
        return name in self._weights or name in self._biases or name in self.adapter.full

    def weight_module(self, name: str) -> LoraModule | None:
        """The LoRA module (DoRA included) changing tensor ``name`` when nothing else changes it, else None."""
        module = self._weights.get(name)
        if module is None or name in self._biases:
            return None
        key = self.adapter.full.get(name)
        return module if key is None or self._equals_base(name, key) else None

    def _equals_base(self, name: str, key: str) -> bool:
        """Whether the adapter's whole copy ``key`` of base tensor ``name`` is PEFT's saved base layer, unchanged."""
        if not is_base_layer_key(key):
            return False
        with safe_open(self.adapter.weights_file, framework="pt", device="cpu") as f:
            saved = f.get_tensor(key)
        return torch.equal(saved, self.base.get_tensor(name).to(saved.dtype))

    def module_of(self, name: str) -> LoraModule | None:
        """The LoRA module whose ΔW alone changes tensor ``name`` (None when something else changes it too).

        PEFT saves a targeted embedding layer whole (``base_layer.weight``); a copy equal to the
        base tensor changes nothing and does not count.
        """
        module = self.weight_module(name)
        return module if module is not None and module.magnitude_key is None else None

    def get_tensor(self, name: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` of the adapted model (float32 when changed and no ``dtype`` is asked for)."""
        if not self.changes(name):
            return self.base.get_tensor(name, device=device, dtype=dtype)
        with safe_open(self.adapter.weights_file, framework="pt", device="cpu") as f:
            if name in self.adapter.full:
                tensor = f.get_tensor(self.adapter.full[name])
            else:
                tensor = self.base.get_tensor(name, device="cpu")
            tensor = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
            module = self._weights.get(name)
            if module is not None:
                tensor = self._apply(f, module, tensor)
            module = self._biases.get(name)
            if module is not None:
                tensor = tensor + module.scale * f.get_tensor(module.bias_key).to(tensor.dtype)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def _apply(self, f, module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
        delta = lora_delta(f.get_tensor(module.a_key), f.get_tensor(module.b_key), module.scale, module.transpose)
        delta = delta.to(weight.dtype)
        if module.magnitude_key is not None:
            return dora_weight(weight, delta, f.get_tensor(module.magnitude_key))
        return weight + delta

    def close(self) -> None:
        """Close the base reader (shared readers may be closed more than once)."""
        close = getattr(self.base, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"AdapterReader({self.path} on {getattr(self.base, 'path', '<base>')})"


def split_reference(name: str) -> tuple[str, str] | None:
    """mergekit's ``base+adapter`` model reference as (base, adapter), or None for a plain path."""
    if "+" not in name or Path(name).exists():
        return None
    base, adapter = name.split("+", 1)
    if not base or not adapter:
        raise AdapterError(f"model '{name}': expected 'base+adapter' with both parts given")
    return base, adapter


def mergekit_references(recipe, base_dir: Path | None = None):
    """``recipe`` with every adapter directory among its models written ``base+adapter``, the form mergekit reads.

    The base is the recipe's ``base_model``; paths are resolved against ``base_dir`` (the recipe's folder)
    only to recognise adapter directories. Recipes without adapters come back unchanged.
    """
    from evomerge.lora.adapter import is_adapter_dir

    if not recipe.base_model:
        return recipe

    def adapter(name: str) -> bool:
        p = Path(name).expanduser()
        if not p.is_absolute() and base_dir is not None and not p.exists():
            p = base_dir / p
        return split_reference(name) is None and is_adapter_dir(p)

    mapping = {m: f"{recipe.base_model}+{m}" for m in recipe.referenced_models() if m != recipe.base_model
               and adapter(m)}
    return recipe.with_paths(mapping) if mapping else recipe

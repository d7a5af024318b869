"""PEFT LoRA adapters read from their files: configuration, modules and exact scalings, headers only.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a module
``m`` of the base model with factors A (r × in) and B (out × r) the adapter changes the weight by

    ΔW = s·B·A,   s = α/r   (Hu et al. 2021, "LoRA", arXiv:2106.09685)
                  s = α/√r  with ``use_rslora`` (Kalajdzievski 2023, "rsLoRA", arXiv:2312.03732)

with r and α taken per module from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches
(PEFT's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)``). Embedding
modules store ``lora_embedding_A`` (r × vocab) and ``lora_embedding_B`` (dim × r) and change the
weight by (s·B·A)ᵀ, as do linear layers with ``fan_in_fan_out``. ``lora_bias`` adds s·b to the
module's bias; DoRA (``use_dora``, Liu et al. 2024, arXiv:2402.09353) rescales each output row of
W + ΔW to the stored magnitude. Any other stored tensor (``modules_to_save``, biases trained with
``bias: all``, embedding layers PEFT saved whole) replaces the base tensor of the same name.

Options that change what the adapter means in ways not handled here (``target_parameters``, aLoRA,
LoRA initialisations that rewrite the base weights, ...) are refused by :func:`read_adapter` with an
error naming the file; nothing is ever silently approximated.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# configuration keys that do not change the merged weights (metadata, training or loading options)
NEUTRAL_KEYS = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout", "task_type",
    "peft_version", "target_modules", "exclude_modules", "layers_pattern", "layers_to_transform",
    "megatron_core", "qalora_group_size", "init_lora_weights", "ensure_weight_tying", "modules_to_save",
    "bias", "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "r",
    "lora_alpha", "peft_type", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
# initialisations that rewrite the base weights: the adapter only means something on that rewritten base
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "orthogonal")


class AdapterError(ValueError):
    """An adapter that cannot be used as asked; the message names the file and the problem."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are stored and how they change the base tensor."""

    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float  # s in ΔW = s·B·A
    transpose: bool  # ΔW = (s·B·A)ᵀ (embeddings, fan_in_fan_out)
    magnitude_key: str | None = None  # DoRA's per-row magnitude
    bias_key: str | None = None  # lora_bias: the bias of B

    @property
    def weight(self) -> str:
        """The base tensor this module's ΔW is added to."""
        return f"{self.name}.weight"

    @property
    def bias(self) -> str:
        return f"{self.name}.bias"


@dataclass
class LoraAdapter:
    """A parsed adapter: its configuration, modules and header shapes (no tensor data read)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by module name
    full: dict[str, str]  # base tensor name -> adapter key of a tensor that replaces it
    shapes: dict[str, tuple[int, ...]]  # adapter key -> shape
    dtypes: dict[str, Any] = field(default_factory=dict)  # adapter key -> torch dtype

    @property
    def weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def changed_tensors(self) -> set[str]:
        """Every base tensor name this adapter changes."""
        out = set(self.full)
        for m in self.modules.values():
            out.add(m.weight)
            if m.bias_key:
                out.add(m.bias)
        return out


def is_adapter_dir(path: str | Path) -> bool:
    """True for a directory holding a PEFT ``adapter_config.json`` (and no model ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` matching ``module`` the way PEFT matches rank/alpha patterns."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """LoRA's scaling s: α/r, or α/√r for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: cannot read the adapter configuration: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return config


def check_config(config: dict[str, Any], where: str) -> list[str]:
    """Problems that make an adapter configuration unusable here (empty: usable)."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: only LoRA adapters (peft_type LORA) are supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"{key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in pattern.values()):
            problems.append(f"{key} must map module patterns to positive numbers, got {pattern!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights {init!r} rewrites the base weights, so this adapter does not apply to "
                        f"the plain base model; convert it to a plain LoRA first (PEFT's "
                        f"path_initial_model_for_weight_conversion)")
    if config.get("target_parameters"):
        problems.append(f"target_parameters {config['target_parameters']!r} (LoRA on raw parameters) is not "
                        f"supported")
    for key, value in config.items():
        if key not in NEUTRAL_KEYS and value not in (None, False, {}, [], "", 0):
            problems.append(f"option {key}={value!r} is not supported (it changes what the adapter computes)")
    return [f"{where}: {p}" for p in problems]


def _header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Shapes and torch dtypes of every tensor in a safetensors file, from its header only."""
    import torch

    codes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    shapes, dtypes = {}, {}
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                if view.get_dtype() not in codes:
                    raise AdapterError(f"{file}: tensor {key!r} has dtype {view.get_dtype()}; expected floats")
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = codes[view.get_dtype()]
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{file}: not a readable safetensors file (corrupt or truncated?): {e}") from None
    return shapes, dtypes


_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                     r"lora_embedding_B|lora_magnitude_vector)$")


def read_adapter(path: str | Path) -> LoraAdapter:
    """Parse and check an adapter directory from its configuration and tensor headers (no tensor data).

    Raises :class:`AdapterError` naming the file on an unsupported option, a missing or unknown
    tensor, or factors whose shapes disagree with the configured ranks.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory does not exist")
    config = _read_config(path)
    problems = check_config(config, str(path / ADAPTER_CONFIG))
    if problems:
        raise AdapterError("\n".join(problems))
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise AdapterError(f"{file}: missing (found {found}); pickled adapter_model.bin files are not read")
    shapes, dtypes = _header(file)
    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in shapes:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{file}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter")
        name = key[len(PEFT_PREFIX):]
        match = _FACTOR.match(name)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = key
        elif ".lora_" in name:
            raise AdapterError(f"{file}: tensor {key!r} is a LoRA tensor of a kind not supported here")
        else:
            full[name.replace(".base_layer.", ".")] = key
    modules = {}
    for module, found in parts.items():
        modules[module] = _module(module, found, config, shapes, str(file))
    conflicts = sorted(c for c in set(full) & {m.weight for m in modules.values()} if not is_base_layer_key(full[c]))
    if conflicts:
        raise AdapterError(f"{file}: tensor(s) {conflicts[:3]} are both replaced whole (modules_to_save) and "
                           f"changed by LoRA factors; this combination is ambiguous and refused")
    if not modules and not full:
        raise AdapterError(f"{file}: holds no tensors")
    return LoraAdapter(path, config, modules, full, shapes, dtypes)


def is_base_layer_key(key: str) -> bool:
    """True for a tensor PEFT saved from the wrapped base layer itself (``…base_layer.weight``)."""
    return ".base_layer." in key


def _module(module: str, found: dict[str, str], config: dict, shapes: dict, where: str) -> LoraModule:
    """One module's factors checked against the configuration (ranks, kinds, DoRA, lora_bias)."""
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    missing = [p for p in (a_part, b_part) if p not in found]
    if missing:
        raise AdapterError(f"{where}: module {module} has no {missing[0]} tensor")
    a_shape, b_shape = shapes[found[a_part]], shapes[found[b_part]]
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise AdapterError(f"{where}: module {module}: factors of shapes {list(a_shape)} and {list(b_shape)}; only "
                           f"linear and embedding layers (2-D factors) are supported")
    rank_key = pattern_key(config.get("rank_pattern") or {}, module)
    alpha_key = pattern_key(config.get("alpha_pattern") or {}, module)
    rank = int(config["rank_pattern"][rank_key] if rank_key else config["r"])
    alpha = float(config["alpha_pattern"][alpha_key] if alpha_key else config["lora_alpha"])
    if a_shape[0] != rank or b_shape[1] != rank:
        raise AdapterError(f"{where}: module {module}: factors have rank {a_shape[0]}/{b_shape[1]} "
                           f"({list(a_shape)}, {list(b_shape)}) but the configuration gives r={rank}")
    dora = "lora_magnitude_vector" in found
    if bool(config.get("use_dora")) != dora:
        raise AdapterError(f"{where}: module {module}: use_dora is {bool(config.get('use_dora'))} but the DoRA "
                           f"magnitude vector is {'present' if dora else 'missing'}")
    if dora and (embedding or config.get("fan_in_fan_out")):
        raise AdapterError(f"{where}: module {module}: DoRA on embedding or fan_in_fan_out layers is not supported")
    if "lora_B.bias" in found and not config.get("lora_bias"):
        raise AdapterError(f"{where}: module {module} has lora_B.bias but lora_bias is false")
    return LoraModule(
        name=module, kind="embedding" if embedding else "linear", a_key=found[a_part], b_key=found[b_part],
        rank=rank, alpha=alpha, scale=lora_scale(rank, alpha, bool(config.get("use_rslora"))),
        transpose=embedding or bool(config.get("fan_in_fan_out")),
        magnitude_key=found.get("lora_magnitude_vector"), bias_key=found.get("lora_B.bias"))


def check_against_base(adapter: LoraAdapter, shape_of, has_tensor, base_name: str) -> list[str]:
    """Problems of ``adapter`` on a base model given by ``shape_of(name)`` / ``has_tensor(name)`` (headers only).

    Every adapted module must exist with a weight of the factors' shape; replaced tensors must exist
    with the same shape. Empty list: the adapter fits.
    """
    where = str(adapter.weights_file)
    problems = []
    for m in adapter.modules.values():
        if not has_tensor(m.weight):
            problems.append(f"{where}: module {m.name}: the base model '{base_name}' has no tensor {m.weight} "
                            f"(an adapter of another architecture?)")
            continue
        out_dim, in_dim = adapter.shapes[m.b_key][0], adapter.shapes[m.a_key][1]
        expected = (in_dim, out_dim) if m.transpose else (out_dim, in_dim)
        got = tuple(shape_of(m.weight))
        if got != expected:
            problems.append(f"{where}: module {m.name}: the factors give a {list(expected)} update but the base "
                            f"tensor {m.weight} is {list(got)} (an adapter of another base model?)")
        if m.magnitude_key and adapter.shapes[m.magnitude_key] != (got[0],):
            problems.append(f"{where}: module {m.name}: DoRA magnitude {list(adapter.shapes[m.magnitude_key])} "
                            f"does not match {list(got)}")
        if m.bias_key:
            if not has_tensor(m.bias):
                problems.append(f"{where}: module {m.name} has lora_bias but the base tensor {m.bias} does not "
                                f"exist (PEFT cannot merge it either)")
            elif tuple(shape_of(m.bias)) != adapter.shapes[m.bias_key]:
                problems.append(f"{where}: module {m.name}: lora_B.bias {list(adapter.shapes[m.bias_key])} does "
                                f"not match {m.bias} {list(shape_of(m.bias))}")
    for name, key in adapter.full.items():
        if not has_tensor(name):
            problems.append(f"{where}: tensor {key} replaces {name}, which the base model '{base_name}' does not "
                            f"have")
        elif tuple(shape_of(name)) != adapter.shapes[key]:
            problems.append(f"{where}: tensor {key} {list(adapter.shapes[key])} does not match the base tensor "
                            f"{name} {list(shape_of(name))}")
    return problems

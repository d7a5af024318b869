"""Checkpoint I/O: lazy reading of Hugging Face model directories, atomic sharded writing.

Reading (`ModelReader`) validates a whole model directory from file headers alone (config, index,
every shard's safetensors header) so that a bad input fails before any tensor data is read; tensors
are then read one at a time with positional reads (no memory map, so file pages never count in the
process's RSS). Writing (`CheckpointWriter`) streams each tensor's bytes to disk as it arrives, into
a hidden temporary directory beside the target, and renames it into place only on `commit()`, so an
interrupted merge never leaves a half-written model behind and never holds its output in memory.

Layouts follow `transformers` (`PreTrainedModel.save_pretrained`): a single `model.safetensors`, or
`model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`; the pickled
`pytorch_model.bin` equivalents are read only on request (`allow_pickle=True`).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(Exception):
    """A model directory or output directory that cannot be read or written as asked."""


CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFE_SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
PICKLE_SHARD_RE = re.compile(r"^pytorch_model-(\d+)-of-(\d+)\.bin$")

# safetensors header dtype codes -> torch dtypes (the float8 types exist only in newer torch).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}

# Input embeddings an absent `lm_head.weight` is tied to when the architecture class is unknown
# (mergekit's architecture files list the same pairs as `tied_names`).
_FALLBACK_TIED_EMBEDDINGS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "transformer.embd.wte.weight",
)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what its header says."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None  # absolute byte offset of the data in `file` (safetensors only)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def _read_json(path: Path, what: str) -> Any:
    """Parse the JSON file `path`, raising CheckpointError that names it (`what` says which file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON (not UTF-8 text)") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e


def _first_int(config: dict, keys: tuple[str, ...]) -> int | None:
    """The first integer value among `keys` of `config` (then of its `text_config`), else None."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            for key in keys:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    return None


def _tie_word_embeddings(config: dict) -> bool:
    """The effective `tie_word_embeddings` of a config dict, as transformers would resolve it.

    An explicit key wins (top level, then `text_config`); otherwise the default of the model
    type's config class; otherwise True, the historical `PretrainedConfig` default.
    """
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("tie_word_embeddings"), bool):
            return cfg["tie_word_embeddings"]
    try:
        from transformers import CONFIG_MAPPING

        default = CONFIG_MAPPING[config.get("model_type")]()
        return bool(default.get_text_config().tie_word_embeddings)
    except Exception:  # unknown model type or a config class without the attribute
        return True


def _tied_weight_pairs(architectures: list[str]) -> dict[str, str]:
    """{tied name: source name} from the transformers model class (`_tied_weights_keys`), if known."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}
    for arch in architectures:
        try:
            cls = getattr(transformers, arch, None)
        except Exception:  # lazy-import failure of an optional model module
            cls = None
        keys = getattr(cls, "_tied_weights_keys", None)
        if isinstance(keys, dict):
            return {str(k): str(v) for k, v in keys.items()}
    return {}


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """{name: (shape, dtype, absolute data offset)} in data-offset order, from a safetensors header.

    safetensors itself rejects corrupt headers and files whose size does not match the header's
    data offsets ("incomplete metadata, file not fully covered"), so a truncated file fails here.
    No tensor data is read.
    """
    try:
        with safe_open(file, framework="pt") as f:
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            entries = {}
            for name in names:
                view = f.get_slice(name)
                code = view.get_dtype()
                if code not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {code}")
                entries[name] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES[code])
        with open(file, "rb") as raw:  # validated above; now the byte offsets of every tensor
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
        start = 8 + header_len
        return {name: (shape, dtype, start + int(header[name]["data_offsets"][0]))
                for name, (shape, dtype) in entries.items()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e


def _load_pickled(file: Path) -> dict[str, torch.Tensor]:
    """A memory-mapped `torch.load` of a pickled state dict, restricted to tensors (weights_only)."""
    try:
        state = torch.load(file, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), OSError, ...
        raise CheckpointError(f"{file}: cannot load pickled weights (corrupt or truncated?): {e}") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: expected a state dict of named tensors")
    return state


def _check_shard_name(index_path: Path, name: Any) -> str:
    """A shard file name from an index: a plain file name inside the model directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{index_path}: weight_map names an invalid shard file {name!r}")
    return name


def _read_index(index_path: Path) -> dict[str, str]:
    """The `weight_map` {tensor: shard file} of a transformers `*.index.json`."""
    index = _read_json(index_path, "weight index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(
            f"{index_path}: malformed weight index: expected an object with a 'weight_map' object"
        )
    weight_map = index["weight_map"]
    if not weight_map:
        raise CheckpointError(f"{index_path}: weight_map is empty")
    return {str(name): _check_shard_name(index_path, shard) for name, shard in weight_map.items()}


def _shards_by_pattern(model_dir: Path, pattern: re.Pattern) -> list[Path]:
    """Shard files `prefix-0000i-of-0000N.ext` in `model_dir`, checked to form one complete set."""
    found = {}
    for entry in model_dir.iterdir():
        match = pattern.match(entry.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = entry
    if not found:
        return []
    totals = {total for _, total in found}
    if len(totals) != 1:
        raise CheckpointError(
            f"{model_dir}: shard files from different sets (of {sorted(totals)}) and no index"
        )
    total = totals.pop()
    missing = [i for i in range(1, total + 1) if (i, total) not in found]
    if missing:
        raise CheckpointError(f"{model_dir}: shard(s) {missing} of {total} missing and no index file")
    return [found[(i, total)] for i in range(1, total + 1)]


class ModelReader:
    """Lazy, header-validated access to the tensors of one Hugging Face model directory.

    Everything except tensor data (names, shapes, dtypes, config) is read and checked in the
    constructor. `get_tensor` then reads one tensor from a memory-mapped shard.

    Tied embeddings: when `tie_word_embeddings` is true and the tied tensor (usually
    `lm_head.weight`) is not stored, it is *not* listed by `tensor_names()` and `has_tensor` is
    False for it; `tied_aliases` maps it to the stored source (`model.embed_tokens.weight`), and
    `resolve_tied(name)` returns the stored name to read for any name.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: model directory does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face model directory)")
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: config.json missing; not a Hugging Face model directory")
        config = _read_json(config_path, "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: config.json must be a JSON object")
        self.config: dict = config
        self.model_type: str = str(config.get("model_type") or "")
        architectures = config.get("architectures") or []
        if not isinstance(architectures, list):
            architectures = [architectures]
        self.architectures: list[str] = [str(a) for a in architectures]
        self.num_layers: int | None = _first_int(config, ("num_hidden_layers", "n_layer", "num_layers"))
        self.tie_word_embeddings: bool = _tie_word_embeddings(config)

        self.format, self._infos, self._pickled = self._scan_weights(allow_pickle)
        self.weight_files: list[Path] = list(dict.fromkeys(info.file for info in self._infos.values()))
        self.tied_aliases: dict[str, str] = self._find_tied_aliases()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- construction helpers --------------------------------------------------------------

    def _scan_weights(self, allow_pickle: bool):
        """(format, {name: TensorInfo} in file order, {file: pickled state}) from the weight files."""
        d = self.path
        if (d / SAFE_SINGLE).is_file():
            return "safetensors", self._infos_from_safetensors([d / SAFE_SINGLE], None), {}
        if (d / SAFE_INDEX).is_file():
            weight_map = _read_index(d / SAFE_INDEX)
            files = self._index_files(d / SAFE_INDEX, weight_map)
            return "safetensors", self._infos_from_safetensors(files, weight_map), {}
        shards = _shards_by_pattern(d, SAFE_SHARD_RE)
        if shards:
            return "safetensors", self._infos_from_safetensors(shards, None), {}

        pickled = [p for p in (d / PICKLE_SINGLE, d / PICKLE_INDEX) if p.is_file()]
        pickled_shards = _shards_by_pattern(d, PICKLE_SHARD_RE)
        if pickled or pickled_shards:
            found = (pickled or pickled_shards)[0].name
            if not allow_pickle:
                raise CheckpointError(
                    f"{d}: only pickled weights ({found}) found; unpickling can run arbitrary code, so it is "
                    "refused by default. Convert the model to safetensors, or pass --allow-pickle "
                    "(allow_pickle=True) if you trust this model"
                )
            weight_map = None
            if (d / PICKLE_SINGLE).is_file():
                files = [d / PICKLE_SINGLE]
            elif (d / PICKLE_INDEX).is_file():
                weight_map = _read_index(d / PICKLE_INDEX)
                files = self._index_files(d / PICKLE_INDEX, weight_map)
            else:
                files = pickled_shards
            return "pickle", *self._infos_from_pickled(files, weight_map)

        others = sorted(p.name for p in d.glob("*.safetensors"))
        hint = f" (found {others})" if others else ""
        if (d / "adapter_config.json").is_file():
            hint += "; this looks like a LoRA adapter, which is not a full model"
        raise CheckpointError(
            f"{d}: no weight files: expected {SAFE_SINGLE}, {SAFE_INDEX} "
            f"or model-0000i-of-0000N.safetensors{hint}"
        )

    def _index_files(self, index_path: Path, weight_map: dict[str, str]) -> list[Path]:
        """The existing shard files an index names, in file-name order."""
        files = [self.path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{index_path}: names shard {file.name!r}, which does not exist in {self.path}"
                )
        return files

    def _infos_from_safetensors(
        self, files: list[Path], weight_map: dict[str, str] | None
    ) -> dict[str, TensorInfo]:
        """Tensor infos from safetensors headers; with an index, exactly its weight_map's tensors."""
        infos: dict[str, TensorInfo] = {}
        for file in files:
            header = _safetensors_header(file)
            wanted = header if weight_map is None else [n for n in header if weight_map.get(n) == file.name]
            for name in wanted:
                if name in infos:
                    raise CheckpointError(f"{file}: tensor {name!r} also stored in {infos[name].file.name}")
                shape, dtype, offset = header[name]
                infos[name] = TensorInfo(file, shape, dtype, offset)
        self._check_index_covered(weight_map, infos)
        return infos

    def _infos_from_pickled(self, files: list[Path], weight_map: dict[str, str] | None):
        """Tensor infos and memory-mapped state dicts from pickled shards (loaded weights_only)."""
        infos: dict[str, TensorInfo] = {}
        states: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            state = states[file] = _load_pickled(file)
            for name, tensor in state.items():
                if weight_map is not None and weight_map.get(name) != file.name:
                    continue
                if name in infos:
                    raise CheckpointError(f"{file}: tensor {name!r} also stored in {infos[name].file.name}")
                infos[name] = TensorInfo(file, tuple(tensor.shape), tensor.dtype)
        self._check_index_covered(weight_map, infos)
        return infos, states

    def _check_index_covered(self, weight_map: dict[str, str] | None, infos: dict[str, TensorInfo]) -> None:
        """Every tensor an index names must be in the shard it names."""
        if weight_map is None:
            return
        for name, shard in weight_map.items():
            if name not in infos:
                raise CheckpointError(
                    f"{self.path / shard}: the weight index lists tensor {name!r} in this shard, "
                    "but the shard does not contain it"
                )

    def _find_tied_aliases(self) -> dict[str, str]:
        """{absent tied name: stored source name} when the config ties word embeddings."""
        if not self.tie_word_embeddings:
            return {}
        pairs = _tied_weight_pairs(self.architectures)
        if not pairs:
            source = next((n for n in _FALLBACK_TIED_EMBEDDINGS if n in self._infos), None)
            pairs = {"lm_head.weight": source} if source else {}
        return {alias: src for alias, src in pairs.items() if alias not in self._infos and src in self._infos}

    # -- metadata (headers only) -------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """Names of the stored tensors, in file order (shards in order, then data offset)."""
        return list(self._infos)

    def has_tensor(self, name: str) -> bool:
        """True if `name` is stored (tied aliases are not)."""
        return name in self._infos

    def __contains__(self, name: str) -> bool:
        return self.has_tensor(name)

    def resolve_tied(self, name: str) -> str:
        """The stored tensor to read for `name`: itself if stored, its tie source if tied."""
        if name in self._infos:
            return name
        if name in self.tied_aliases:
            return self.tied_aliases[name]
        raise self._missing(name)

    def info(self, name: str) -> TensorInfo:
        """File, shape and dtype of a stored tensor, from headers only."""
        try:
            return self._infos[name]
        except KeyError:
            raise self._missing(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a stored tensor, from headers only."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of a stored tensor, from headers only."""
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        """Data size of a stored tensor in bytes, from headers only."""
        return self.info(name).nbytes

    def _missing(self, name: str) -> CheckpointError:
        """The error for a tensor name this model does not store."""
        msg = f"{self.path}: tensor {name!r} not found in model"
        if name in self.tied_aliases:
            msg += (
                f"; it is tied to {self.tied_aliases[name]!r} (tie_word_embeddings=true), "
                "read that one (see ModelReader.resolve_tied)"
            )
        return CheckpointError(msg)

    # -- data --------------------------------------------------------------------------------

    def get_tensor(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one stored tensor onto `device` (cast to `dtype` if given); the result owns its memory.

        safetensors data is read with positional reads into a fresh buffer rather than through a
        memory map: the file's pages stay in the page cache, not in this process's resident set,
        so reading a model tensor by tensor never grows RSS beyond the tensors alive.
        """
        info = self.info(name)
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed (reading tensor {name!r})")
        device = torch.device(device)
        if self.format == "pickle":
            tensor = self._pickled[info.file][name]
            if tensor.device == device and dtype in (None, tensor.dtype):
                return tensor.clone()
            return tensor.to(device=device, dtype=dtype, copy=True)
        tensor = self._read(info, name)
        if tensor.device == device and dtype in (None, tensor.dtype):
            return tensor
        return tensor.to(device=device, dtype=dtype)

    def _read(self, info: TensorInfo, name: str) -> torch.Tensor:
        """The bytes of one safetensors tensor, read with os.preadv into a new CPU tensor."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            fd = self._fd(info.file)
            view = memoryview(buffer.numpy())
            done = 0
            while done < info.nbytes:  # preadv may return short reads for very large tensors
                n = os.preadv(fd, [view[done:]], info.offset + done)
                if n <= 0:
                    raise OSError(f"unexpected end of file at byte {info.offset + done}")
                done += n
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from e
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return buffer.view(info.dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        """An open read-only descriptor of `file`, opened on first use."""
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{file}: cannot open safetensors file: {e}") from e
            return fd

    def close(self) -> None:
        """Release file handles and memory maps; metadata stays available, reading does not."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._pickled = {}
            self._closed = True

    def __del__(self, _close=os.close) -> None:  # bound now: at interpreter exit `os` may already be gone
        fds = getattr(self, "_fds", {})
        for fd in fds.values():
            try:
                _close(fd)
            except OSError:
                pass
        fds.clear()

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelReader({str(self.path)!r}, {len(self._infos)} tensors, {self.format})"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as 1000, "500MB", "2GB" (powers of 1000) or "1.5GiB" (powers of 1024).

    Units follow transformers' `max_shard_size` convention; the result must be a positive integer.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"invalid size {text!r}: expected an integer number of bytes or a string like '2GB'")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"invalid size {text!r}: must be a positive number of bytes")
        return text
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GB' or '1.5GiB'"
        )
    try:
        value = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimal numbers
        raise ValueError(f"invalid size {text!r}") from e
    if value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return int(value)


@dataclass
class WriterStats:
    """Progress counters of a CheckpointWriter (bytes are tensor data bytes)."""

    tensors_added: int = 0
    bytes_added: int = 0
    tensors_written: int = 0
    bytes_written: int = 0
    shards_written: int = 0


def staging_dir(target: Path, word: str = "tmp") -> Path:
    """A new hidden directory beside ``target`` (``.NAME.WORD-XXXX``) to build it in before one rename, with
    the permissions an ordinary ``mkdir`` gets under the process's umask (``mkdtemp`` makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{word}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextmanager
def staged(target: Path, word: str = "tmp"):
    """A staging directory (``staging_dir``) to fill in the block; when the block ends, it takes ``target``'s
    place (an old ``target`` is moved aside first and removed after), and on any error it is removed and
    ``target`` is left as it was: readers see the old directory or the whole new one, never a part."""
    tmp = staging_dir(target, word)
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask, read from /proc (setting it to read it back would race with other threads);
    022 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_path(path: Path) -> None:
    """Flush a file's or directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_weight_file_name(name: str) -> bool:
    """True for names the writer itself produces (weights and index)."""
    return name in (SAFE_SINGLE, SAFE_INDEX) or bool(SAFE_SHARD_RE.match(name))


_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class _ShardPart:
    """One shard being written, its tensor bytes appended as they arrive.

    With ``planned`` entries (name, shape, dtype known in advance) the header is written first and
    the data goes straight to its final place. Otherwise the data goes to a side file and
    ``finish`` writes the 8-byte header length, the JSON header (padded with spaces to 8 bytes, as
    the format allows) and the data, copied inside the kernel. Either way no tensor is held in memory.
    """

    def __init__(self, path: Path, planned: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        self.path = path
        self.planned = planned
        self.entries: dict[str, dict[str, Any]] = {}
        self.names: list[str] = []
        self.nbytes = 0
        if planned is None:
            self.data_path = path.with_suffix(".data")
            self.fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            return
        offset, entries = 0, {}
        for name, shape, dtype in planned:
            size = math.prod(shape) * dtype.itemsize
            entries[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self.fd, _header_bytes(entries))

    @property
    def complete(self) -> bool:
        return self.planned is not None and len(self.names) == len(self.planned)

    def append(self, name: str, data: torch.Tensor) -> None:
        if self.planned is not None:
            want = self.planned[len(self.names)]
            if (name, tuple(data.shape), data.dtype) != (want[0], tuple(want[1]), want[2]):
                raise CheckpointError(f"{self.path}: expected tensor {want[0]!r} {list(want[1])} {want[2]} next, "
                                      f"got {name!r} {list(data.shape)} {data.dtype}")
        raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        _write_all(self.fd, raw)
        self.entries[name] = {"dtype": _DTYPE_CODES[data.dtype], "shape": list(data.shape),
                              "data_offsets": [self.nbytes, self.nbytes + len(raw)]}
        self.names.append(name)
        self.nbytes += len(raw)

    def finish(self) -> None:
        if self.planned is not None:
            if not self.complete:
                missing = [n for n, _, _ in self.planned[len(self.names):]]
                raise CheckpointError(f"{self.path}: planned tensors never written: {missing[:5]}")
            os.fsync(self.fd)
            os.close(self.fd)
            return
        os.close(self.fd)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as src:
            out.write(_header_bytes(self.entries))
            out.flush()
            _copy_file(src.fileno(), out.fileno(), self.nbytes)
            os.fsync(out.fileno())
        os.unlink(self.data_path)

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _header_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    """The safetensors prefix: 8-byte little-endian length, then the JSON header padded to 8 bytes."""
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])


def _plan_shards(expected, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Group (name, shape, dtype) entries, in order, into shards of at most `max_shard_bytes`."""
    shards, current, size = [], [], 0
    for name, shape, dtype in expected:
        if dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), dtype))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _copy_file(src: int, dst: int, count: int) -> None:
    """Copy `count` bytes from `src`'s current offset to `dst`'s, inside the kernel where possible."""
    copied = 0
    try:
        while copied < count:
            n = os.copy_file_range(src, dst, count - copied)
            if n == 0:
                break
            copied += n
    except (AttributeError, OSError):
        pass
    while copied < count:
        n = os.sendfile(dst, src, None, count - copied)
        if n == 0:
            raise OSError(f"short copy: {copied} of {count} bytes")
        copied += n


class CheckpointWriter:
    """Atomically write a sharded safetensors checkpoint plus side files into `out_dir`.

    Everything goes to a hidden temporary directory beside `out_dir` (same parent, so the final
    rename is atomic); `commit()` names the shards, writes the index, fsyncs and renames it into
    place. Used as a context manager it commits on a clean exit and deletes the temporary
    directory on any exception (KeyboardInterrupt included), leaving no output behind.

    `add_tensor` writes each tensor's bytes to the current shard's data file at once (the caller may
    reuse or modify its tensor right away); a shard is closed when the next tensor would take it
    past `max_shard_bytes`.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                 expected: Sequence[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        self.out_dir = Path(out_dir).absolute()
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self._check_target()
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = staging_dir(self.out_dir)
        except OSError as e:
            raise CheckpointError(
                f"{self.out_dir}: cannot create a temporary directory beside it: {e}"
            ) from e
        self._part: _ShardPart | None = None  # the shard being written
        self._shards: list[tuple[Path, list[str]]] = []
        # with `expected` (every tensor's name, shape and dtype, in order) shards are laid out up
        # front, so each shard's header is written first and data never needs a second copy
        self._layout = _plan_shards(expected, max_shard_bytes) if expected is not None else None
        self._names: set[str] = set()
        self._state = "open"
        self.stats = WriterStats()

    def _check_target(self) -> None:
        """Refuse an existing output unless overwriting, and never replace a non-directory."""
        out = self.out_dir
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise CheckpointError(f"{out}: output directory exists; pass --overwrite to replace it")
            if out.is_symlink() or not out.is_dir():
                raise CheckpointError(f"{out}: exists and is not a directory; refusing to replace it")

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise CheckpointError(f"{self.out_dir}: cannot {action}: writer already {self._state}")

    # -- tensors -----------------------------------------------------------------------------

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes as `name` into the current shard; start a new shard if it would overflow.

        Tensor data goes to disk at once (nothing is buffered in memory), so the caller may reuse
        or modify its tensor right away and a merge's memory never holds its output.
        """
        self._require_open(f"add tensor {name!r}")
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{self.out_dir}: invalid tensor name {name!r}")
        if name in self._names:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} added twice")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{self.out_dir}: tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor"
            )
        if tensor.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} has dtype {tensor.dtype}, "
                                  f"which safetensors cannot store")
        data = tensor.detach().to("cpu").contiguous()
        nbytes = data.numel() * data.element_size()
        if self._layout is None and self._part is not None and self._part.nbytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._part is None:
            path = self._tmp / f"shard-{len(self._shards) + 1:05d}.safetensors.part"
            if self._layout is not None:
                if len(self._shards) >= len(self._layout):
                    raise CheckpointError(f"{self.out_dir}: tensor {name!r} was not in the expected layout")
                self._part = _ShardPart(path, self._layout[len(self._shards)])
            else:
                self._part = _ShardPart(path)
        self._part.append(name, data)
        self._names.add(name)
        self.stats.tensors_added += 1
        self.stats.bytes_added += nbytes
        if self._part.complete:
            self._flush()

    def _flush(self) -> None:
        """Close the current shard as a safetensors file (temporary name)."""
        if self._part is None:
            return
        part, self._part = self._part, None
        part.finish()
        self._shards.append((part.path, part.names))
        self.stats.tensors_written += len(part.names)
        self.stats.bytes_written += part.nbytes
        self.stats.shards_written += 1

    # -- side files ----------------------------------------------------------------------------

    def _target(self, relpath: str | Path) -> Path:
        """The temp-dir path for `relpath`, which must stay inside the output and not be a weight file."""
        rel = PurePosixPath(str(relpath).replace("\\", "/"))
        if not str(relpath) or rel.is_absolute() or ".." in rel.parts or str(rel) == ".":
            raise CheckpointError(f"{self.out_dir}: invalid output file path {str(relpath)!r}")
        if len(rel.parts) == 1 and _is_weight_file_name(rel.name):
            raise CheckpointError(f"{self.out_dir}: {rel.name!r} is written by the checkpoint writer itself")
        path = self._tmp.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, relpath: str | Path, text: str) -> None:
        """Write a UTF-8 text file into the output."""
        self._require_open(f"write {relpath}")
        path = self._target(relpath)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, relpath: str | Path, obj: Any) -> None:
        """Write `obj` as indented JSON into the output."""
        self.write_text(relpath, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def copy_file(self, src: str | Path, relpath: str | Path) -> None:
        """Copy the file `src` into the output as `relpath`."""
        self._require_open(f"copy {src}")
        src = Path(src)
        if not src.is_file():
            raise CheckpointError(f"{src}: cannot copy into {self.out_dir}: not a file")
        path = self._target(relpath)
        shutil.copyfile(src, path)
        _fsync_path(path)

    # -- finish --------------------------------------------------------------------------------

    def commit(self) -> Path:
        """Flush, name the shards and index, fsync, and atomically move the output into place."""
        self._require_open("commit")
        try:
            self._flush()
            if self._layout is not None and len(self._shards) != len(self._layout):
                planned = sum(len(shard) for shard in self._layout)
                raise CheckpointError(f"{self.out_dir}: {self.stats.tensors_added} of the {planned} expected "
                                      f"tensors were written")
            if not self._shards:
                raise CheckpointError(
                    f"{self.out_dir}: no tensors were added; refusing to write an empty model"
                )
            self._finalize_shards()
            _fsync_path(self._tmp)
            old = self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        if old is not None:
            shutil.rmtree(old)
        return self.out_dir

    def _finalize_shards(self) -> None:
        """Rename temporary shards to their transformers names; write the index when sharded."""
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self._tmp / SAFE_SINGLE)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self._tmp / final)
            weight_map.update({name: final for name in names})
        index = {
            "metadata": {"total_size": self.stats.bytes_written},
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = self._tmp / SAFE_INDEX
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _fsync_path(path)

    def _move_into_place(self) -> Path | None:
        """Rename the temp dir to `out_dir`; an existing one (overwrite) is moved aside and returned."""
        out, parent = self.out_dir, self.out_dir.parent
        self._check_target()
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.rename(out, old)
            try:
                os.rename(self._tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
        else:
            os.rename(self._tmp, out)
        _fsync_path(parent)
        return old

    def abort(self) -> None:
        """Discard everything written so far (no-op once committed)."""
        if self._state == "open":
            self._state = "aborted"
            if self._part is not None:
                self._part.discard()
                self._part = None
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()
        return False


TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
    "chat_template*",
    "generation_config.json",
)


def copy_tokenizer_files(src_dir: str | Path, writer: CheckpointWriter) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of a model directory; returns their names."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise CheckpointError(f"{src_dir}: not a directory (copying tokenizer files)")
    copied = []
    for entry in sorted(src_dir.iterdir()):
        if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in TOKENIZER_FILE_PATTERNS):
            writer.copy_file(entry, entry.name)
            copied.append(entry.name)
    return copied

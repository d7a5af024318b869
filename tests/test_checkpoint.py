"""Tests for evomerge.checkpoint: lazy reading of HF model directories and atomic sharded writing.

Every fixture is a real checkpoint written by transformers (`save_pretrained`) or safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import evomerge  # noqa: F401  (sets the offline environment before transformers is imported)
from evomerge.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    ModelReader,
    copy_tokenizer_files,
    parse_size,
)
from evomerge.tiny import build_tiny_family
from transformers import AutoModelForCausalLM, AutoTokenizer


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Same-seed tiny llamas saved single-file, sharded, and with tied embeddings."""
    root = tmp_path_factory.mktemp("models")
    single, _ = build_tiny_family(root / "single", n_finetunes=0, seed=0)
    sharded, _ = build_tiny_family(root / "sharded", n_finetunes=0, seed=0, max_shard_size="20KB")
    tied, _ = build_tiny_family(root / "tied", n_finetunes=0, seed=0, tie_word_embeddings=True)
    return {"single": single, "sharded": sharded, "tied": tied}


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict transformers itself loads from `path`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_model_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A minimal model directory: config.json plus one model.safetensors."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden temp/old directories the writer may have left beside `parent / name`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def greedy_tokens(path: Path, prompt: str = "1 + 2 = 3 . 4 + 5 =") -> list[int]:
    """A few greedily generated token ids from the model and tokenizer at `path`."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reader_matches_transformers_state_dict(models, layout):
    path = models[layout]
    expected = hf_state_dict(path)
    with ModelReader(path) as reader:
        assert set(reader.tensor_names()) == set(expected)
        for name in reader.tensor_names():
            tensor = reader.get_tensor(name)
            assert tensor.dtype == expected[name].dtype, name
            assert torch.equal(tensor, expected[name]), name
        assert reader.format == "safetensors"
        assert (len(reader.weight_files) > 1) == (layout == "sharded")


def test_sharded_and_single_hold_identical_tensors(models):
    single, sharded = ModelReader(models["single"]), ModelReader(models["sharded"])
    assert len(sharded.weight_files) >= 3
    assert sorted(single.tensor_names()) == sorted(sharded.tensor_names())
    for name in single.tensor_names():
        assert torch.equal(single.get_tensor(name), sharded.get_tensor(name)), name


def test_tensor_names_in_file_order(models):
    reader = ModelReader(models["sharded"])
    expected = []
    for file in sorted({reader.info(n).file for n in reader.tensor_names()}):
        with safe_open(file, framework="pt") as f:
            expected += f.offset_keys()
    assert reader.tensor_names() == expected


def test_config_fields(models):
    reader = ModelReader(models["single"])
    assert reader.model_type == "llama"
    assert reader.architectures == ["LlamaForCausalLM"]
    assert reader.num_layers == 4
    assert reader.tie_word_embeddings is False
    assert reader.config["hidden_size"] == 32


def test_metadata_from_headers_only(tmp_path):
    """Shapes and dtypes come from headers: they work after close(), when no data can be read."""
    tensors = {
        "a.weight": torch.randn(3, 5).to(torch.bfloat16),
        "b.ids": torch.arange(7, dtype=torch.int64),
        "c.half": torch.zeros(2, 2, 2, dtype=torch.float16),
    }
    path = write_model_dir(tmp_path / "m", {"model_type": "llama", "num_hidden_layers": 2}, tensors)
    reader = ModelReader(path)
    reader.close()
    assert reader.shape("a.weight") == (3, 5)
    assert reader.dtype("a.weight") == torch.bfloat16
    assert reader.dtype("b.ids") == torch.int64
    assert reader.shape("c.half") == (2, 2, 2) and reader.dtype("c.half") == torch.float16
    assert reader.nbytes("a.weight") == 3 * 5 * 2
    with pytest.raises(CheckpointError, match="reader is closed"):
        reader.get_tensor("a.weight")
    # Before closing, the data matches.
    assert torch.equal(ModelReader(path).get_tensor("a.weight"), tensors["a.weight"])


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "gpt2", "n_layer": 6}, 6),
        ({"model_type": "x", "num_layers": 3}, 3),
        ({"model_type": "x", "text_config": {"num_hidden_layers": 5}}, 5),
        ({"model_type": "x"}, None),
    ],
)
def test_num_layers_variants(tmp_path, config, expected):
    path = write_model_dir(tmp_path / "m", config, {"w": torch.zeros(2)})
    assert ModelReader(path).num_layers == expected


def test_returned_tensor_owns_its_memory(models):
    """In-place edits of a returned tensor must not leak into later reads (safetensors mmaps share)."""
    reader = ModelReader(models["single"])
    first = reader.get_tensor("model.norm.weight")
    original = first.clone()
    first.add_(100.0)
    assert torch.equal(reader.get_tensor("model.norm.weight"), original)


def test_tied_embeddings(models):
    expected = hf_state_dict(models["tied"])
    reader = ModelReader(models["tied"])
    assert reader.tie_word_embeddings is True
    assert "lm_head.weight" in expected  # transformers exposes the tied head...
    assert "lm_head.weight" not in reader.tensor_names()  # ...but it is not stored
    assert not reader.has_tensor("lm_head.weight")
    assert reader.tied_aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert reader.resolve_tied("lm_head.weight") == "model.embed_tokens.weight"
    assert reader.resolve_tied("model.norm.weight") == "model.norm.weight"
    assert set(reader.tensor_names()) | {"lm_head.weight"} == set(expected)
    head = reader.get_tensor(reader.resolve_tied("lm_head.weight"))
    assert torch.equal(head, expected["lm_head.weight"])
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' not found.*tied to 'model.embed_tokens.weight'"):
        reader.get_tensor("lm_head.weight")
    with pytest.raises(CheckpointError, match="'nope' not found"):
        reader.resolve_tied("nope")


def test_untied_model_has_no_aliases(models):
    reader = ModelReader(models["single"])
    assert reader.tied_aliases == {}
    assert reader.resolve_tied("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize(
    "config, names, aliases",
    [
        # Unknown architecture, explicit tie: fall back to the known embedding names.
        ({"model_type": "mystery", "architectures": ["MysteryForCausalLM"], "tie_word_embeddings": True},
         ["model.embed_tokens.weight"], {"lm_head.weight": "model.embed_tokens.weight"}),
        ({"model_type": "mystery", "tie_word_embeddings": False}, ["model.embed_tokens.weight"], {}),
        # Key absent: the config class default decides (GPT-2 ties), the class names the source.
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
         ["transformer.wte.weight"], {"lm_head.weight": "transformer.wte.weight"}),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ["model.embed_tokens.weight"], {}),
    ],
)
def test_tie_resolution_from_config(tmp_path, config, names, aliases):
    path = write_model_dir(tmp_path / "m", config, {n: torch.zeros(4, 2) for n in names})
    assert ModelReader(path).tied_aliases == aliases


def test_missing_tensor_names_model_and_tensor(models):
    reader = ModelReader(models["sharded"])
    pattern = re.escape(str(models["sharded"])) + r".*'model.layers.9.mlp.up_proj.weight' not found"
    for call in (reader.get_tensor, reader.shape, reader.dtype):
        with pytest.raises(CheckpointError, match=pattern):
            call("model.layers.9.mlp.up_proj.weight")


def test_shards_without_index_are_found(models, tmp_path):
    path = copy_model(models["sharded"], tmp_path / "m")
    (path / "model.safetensors.index.json").unlink()
    assert sorted(ModelReader(path).tensor_names()) == sorted(ModelReader(models["single"]).tensor_names())
    (path / "model-00002-of-00012.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) \[2\] of 12 missing"):
        ModelReader(path)


# Each damage is applied to a fresh copy of a real model; the error must come from the constructor.
def _garbage_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _truncated_header(d: Path) -> None:
    os.truncate(d / "model.safetensors", 50)


def _truncated_data(d: Path) -> None:
    os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 100)


def _truncated_shard(d: Path) -> None:
    os.truncate(d / "model-00005-of-00012.safetensors", (d / "model-00005-of-00012.safetensors").stat().st_size - 8)


def _bad_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama",,}')


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _config_not_object(d: Path) -> None:
    (d / "config.json").write_text("[1, 2]")


def _no_weights(d: Path) -> None:
    for f in d.glob("*.safetensors*"):
        f.unlink()


def _index_garbage(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text("this is not json")


def _index_no_weight_map(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _index_missing_shard(d: Path) -> None:
    (d / "model-00003-of-00012.safetensors").unlink()


def _index_wrong_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00012.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_path_traversal(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../single/base/model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "layout, damage, message",
    [
        ("single", _garbage_header, r"model\.safetensors: not a readable safetensors file \(corrupt or truncated\?\)"),
        ("single", _truncated_header, r"model\.safetensors: not a readable safetensors file.*invalid header length"),
        ("single", _truncated_data, r"model\.safetensors: not a readable safetensors file.*not fully covered"),
        ("sharded", _truncated_shard, r"model-00005-of-00012\.safetensors: not a readable safetensors file"),
        ("single", _bad_config, r"config\.json: config\.json is not valid JSON \(line 1, column 24"),
        ("single", _no_config, r"config\.json: config\.json missing"),
        ("single", _config_not_object, r"config\.json must be a JSON object"),
        ("single", _no_weights, r"no weight files: expected model\.safetensors"),
        ("sharded", _index_garbage, r"model\.safetensors\.index\.json: weight index is not valid JSON"),
        ("sharded", _index_no_weight_map, r"model\.safetensors\.index\.json: malformed weight index"),
        ("sharded", _index_missing_shard, r"index\.json: names shard 'model-00003-of-00012\.safetensors', which does not exist"),
        ("sharded", _index_wrong_shard, r"model-00001-of-00012\.safetensors: the weight index lists tensor 'model\.norm\.weight'"),
        ("sharded", _index_path_traversal, r"index\.json: weight_map names an invalid shard file '\.\./single"),
    ],
)
def test_bad_model_directories_fail_in_constructor(models, tmp_path, layout, damage, message):
    path = copy_model(models[layout], tmp_path / "m")
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        ModelReader(path)
    assert str(path) in str(info.value)


def test_missing_and_non_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nowhere")) + ": model directory does not exist"):
        ModelReader(tmp_path / "nowhere")
    file = tmp_path / "file.txt"
    file.write_text("hi")
    with pytest.raises(CheckpointError, match="file.txt: not a directory"):
        ModelReader(file)


def _pickled_copy(models, dst: Path, sharded: bool) -> Path:
    """A copy of the single-file model whose weights are pickled .bin files (optionally two shards + index)."""
    dst.mkdir()
    shutil.copy(models["single"] / "config.json", dst / "config.json")
    reader = ModelReader(models["single"])
    state = {n: reader.get_tensor(n) for n in reader.tensor_names()}
    if not sharded:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, dst / file)
        weight_map.update({n: file for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("sharded", [False, True])
def test_pickled_weights_refused_then_loaded_with_allow_pickle(models, tmp_path, sharded):
    path = _pickled_copy(models, tmp_path / "bin", sharded)
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.*--allow-pickle"):
        ModelReader(path)
    reader = ModelReader(path, allow_pickle=True)
    assert reader.format == "pickle"
    assert len(reader.weight_files) == (2 if sharded else 1)
    expected = hf_state_dict(models["single"])
    assert set(reader.tensor_names()) == set(expected)
    for name in reader.tensor_names():
        assert reader.shape(name) == tuple(expected[name].shape)
        assert torch.equal(reader.get_tensor(name), expected[name]), name


def test_corrupt_pickle_is_a_checkpoint_error(models, tmp_path):
    path = _pickled_copy(models, tmp_path / "bin", sharded=False)
    os.truncate(path / "pytorch_model.bin", 1000)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot load pickled weights"):
        ModelReader(path, allow_pickle=True)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _write_copy(src: Path, out: Path, **writer_kwargs) -> CheckpointWriter:
    """Copy a model tensor by tensor through a CheckpointWriter (what the engine does)."""
    reader = ModelReader(src)
    with CheckpointWriter(out, **writer_kwargs) as writer:
        for name in reader.tensor_names():
            writer.add_tensor(name, reader.get_tensor(name))
        writer.write_json("config.json", reader.config)
        copied = copy_tokenizer_files(src, writer)
        assert writer.commit() == out.absolute()
    assert copied == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    return writer


@pytest.mark.parametrize("layout", ["single", "tied"])
def test_writer_single_file_round_trip(models, tmp_path, layout):
    out = tmp_path / "out"
    writer = _write_copy(models[layout], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    expected = hf_state_dict(models[layout])
    got = hf_state_dict(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert writer.stats.tensors_written == len(ModelReader(models[layout]).tensor_names())
    assert greedy_tokens(out) == greedy_tokens(models[layout])
    assert leftovers(tmp_path, "out") == []


def test_writer_sharded_round_trip(models, tmp_path):
    out = tmp_path / "out"
    max_bytes = 30_000
    writer = _write_copy(models["single"], out, max_shard_bytes=max_bytes)
    reader = ModelReader(models["single"])
    n = writer.stats.shards_written
    assert n >= 4
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shard_names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = sum(reader.nbytes(name) for name in reader.tensor_names())
    assert index["metadata"]["total_size"] == total == writer.stats.bytes_written == writer.stats.bytes_added
    assert set(index["weight_map"]) == set(reader.tensor_names())
    assert set(index["weight_map"].values()) == set(shard_names)
    for shard in shard_names:
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
        assert all(index["weight_map"][name] == shard for name in names)
        size = sum(reader.nbytes(name) for name in names)
        assert size <= max_bytes or len(names) == 1
    expected, got = hf_state_dict(models["single"]), hf_state_dict(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert greedy_tokens(out) == greedy_tokens(models["single"])
    # Reading our own output back gives the same tensors, in the order they were added.
    assert ModelReader(out).tensor_names() == reader.tensor_names()


def test_writer_oversized_tensors_get_their_own_shards(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(3)}  # 400 bytes each
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=100) as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
    assert writer.stats.shards_written == 3
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {f"t{i}": f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_checkpoint_has_the_umask_permissions(tmp_path, umask):
    """The output directory is built in a private temporary directory and renamed into place; it ends up
    with the permissions mkdir gives under the umask (others can read a 022 checkpoint), not 0700."""
    previous = os.umask(umask)
    try:
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add_tensor("t", torch.ones(4))
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_writer_copies_views_shared_and_reused_tensors(tmp_path):
    """Shared storage (tied embeddings), non-contiguous views and later in-place edits all write correctly."""
    embed = torch.randn(6, 4)
    head = embed  # tied: the very same tensor under two names
    base = torch.randn(4, 6)
    view = base.t()  # non-contiguous view of a bigger storage
    scratch = torch.ones(3)
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add_tensor("embed", embed)
        writer.add_tensor("head", head)
        writer.add_tensor("view", view)
        writer.add_tensor("scratch", scratch)
        scratch.fill_(7.0)  # the caller reuses its buffer before the shard is flushed
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("embed"), embed)
        assert torch.equal(f.get_tensor("head"), embed)
        assert torch.equal(f.get_tensor("view"), base.t())
        assert torch.equal(f.get_tensor("scratch"), torch.ones(3))


def test_writer_preserves_dtypes(tmp_path):
    tensors = {"bf": torch.randn(5).to(torch.bfloat16), "h": torch.randn(2, 3).half(), "i": torch.arange(4)}
    with CheckpointWriter(tmp_path / "out") as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
    path = tmp_path / "out"
    (path / "config.json").write_text("{}")
    reader = ModelReader(path)
    for name, t in tensors.items():
        assert reader.dtype(name) == t.dtype
        assert torch.equal(reader.get_tensor(name), t)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(models, tmp_path, interrupt):
    reader = ModelReader(models["single"])
    out = tmp_path / "out"
    with pytest.raises(type(interrupt)):
        with CheckpointWriter(out, max_shard_bytes=20_000) as writer:
            writer.write_json("config.json", reader.config)
            for name in reader.tensor_names()[:20]:
                writer.add_tensor(name, reader.get_tensor(name))
            assert writer.stats.shards_written >= 2  # part of the output is really on disk
            assert len(leftovers(tmp_path, "out")) == 1  # ... in the temporary directory
            raise interrupt
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []
    assert list(tmp_path.iterdir()) == []


def test_error_while_writing_side_file_cleans_up(tmp_path):
    with pytest.raises(TypeError):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add_tensor("w", torch.zeros(3))
            writer.write_json("config.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=re.escape(str(out)) + ": output directory exists; pass --overwrite"):
        CheckpointWriter(out)
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path, "out") == []


def test_existing_output_replaced_with_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    _write_copy(models["single"], out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "out") == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, overwrite=True) as writer:
            writer.add_tensor("w", torch.zeros(3))
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path, "out") == []


def test_overwrite_refuses_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        CheckpointWriter(target, overwrite=True)


def test_writer_rejects_misuse(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    writer.add_tensor("w", torch.zeros(2))
    with pytest.raises(CheckpointError, match="tensor 'w' added twice"):
        writer.add_tensor("w", torch.zeros(2))
    for bad in ("../escape.json", "/abs.json", ""):
        with pytest.raises(CheckpointError, match="invalid output file path"):
            writer.write_text(bad, "x")
    for reserved in ("model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        with pytest.raises(CheckpointError, match="written by the checkpoint writer itself"):
            writer.write_text(reserved, "x")
    with pytest.raises(CheckpointError, match="missing.txt: cannot copy"):
        writer.copy_file(tmp_path / "missing.txt", "missing.txt")
    writer.write_text("sub/dir/card.md", "# card\n")
    writer.commit()
    assert (tmp_path / "out" / "sub" / "dir" / "card.md").read_text() == "# card\n"
    with pytest.raises(CheckpointError, match="writer already committed"):
        writer.add_tensor("v", torch.zeros(2))


def test_empty_commit_refused_and_cleaned_up(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    writer.write_json("config.json", {})
    with pytest.raises(CheckpointError, match="no tensors were added"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# parse_size
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (1000, 1000),
        ("1000", 1000),
        ("10B", 10),
        ("500MB", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        (" 64 KiB ", 65536),
        ("0.5KB", 500),
        ("1TB", 10**12),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected a number with an optional unit"),
        ("GB", "expected a number with an optional unit"),
        ("abc", "expected a number with an optional unit"),
        ("2XB", "expected a number with an optional unit"),
        ("-1GB", "expected a number with an optional unit"),
        ("1.5", "not a whole number of bytes"),
        ("0", "must be positive"),
        (0, "must be a positive number of bytes"),
        (True, "expected an integer number of bytes"),
        (1.5, "expected an integer number of bytes"),
    ],
)
def test_parse_size_rejects_junk(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)


def test_get_tensor_casts_with_one_owned_copy(tmp_path):
    weight = torch.randn(4, 3).to(torch.bfloat16)
    path = write_model_dir(tmp_path / "m", {"model_type": "llama"}, {"w": weight})
    reader = ModelReader(path)
    as_float = reader.get_tensor("w", dtype=torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, weight.float())
    as_float.zero_()
    assert torch.equal(reader.get_tensor("w"), weight)
    assert reader.get_tensor("w", device=torch.device("cpu"), dtype=torch.bfloat16).dtype == torch.bfloat16

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from evomerge.testing.weights import read_weights  # noqa: F401  (tests import it from here)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny float32 Llama base and three perturbed fine-tunes (ft2 saved sharded)."""
    from evomerge.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("llama")
    base, fts = build_tiny_family(root, family="llama", n_finetunes=3, seed=0, num_layers=4)
    return {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny float32 Qwen2 base and two fine-tunes, with tied embeddings."""
    from evomerge.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("qwen2")
    base, fts = build_tiny_family(root, family="qwen2", n_finetunes=2, seed=1, num_layers=3,
                                  tie_word_embeddings=True)
    return {"base": base, "ft0": fts[0], "ft1": fts[1]}




@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The built-in demo zoo at size tiny, built once per test session."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_zoo_adapters(tiny_zoo):
    """The tiny zoo's LoRA experts (evomerge.zoo_adapters), built once per test session."""
    from evomerge.zoo_adapters import build_adapters

    return build_adapters(tiny_zoo)

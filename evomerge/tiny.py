"""Tiny, deterministic, offline models and tokenizers for tests, demos and benchmarks.

Nothing here downloads anything: configs are built from transformers classes, the tokenizer is
a word-level `tokenizers` model over a fixed vocabulary, and weights come from seeded RNGs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path
from typing import Iterable, Sequence

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
DEFAULT_WORDS = (
    [str(i) for i in range(100)]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["+", "-", "*", "=", "?", ":", ".", ",", "Q", "A", "yes", "no", "the", "is", "of", "and"]
)


def make_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A word-level fast tokenizer (whitespace pre-tokenizer) over `words` plus special tokens.

    Token ids are assigned in order: special tokens first, then `words` (deduplicated).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def tiny_config(
    family: str = "llama",
    *,
    vocab_size: int,
    num_layers: int = 4,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 128,
):
    """A transformers config for a tiny causal LM of the given family (llama, qwen2, mistral)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in classes:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(classes)}")
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_tiny_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Instantiate a causal LM from `config` with weights drawn from `torch.manual_seed(seed)`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def perturbed_copy(model, seed: int, scale: float = 0.02):
    """A fine-tune stand-in: every float parameter plus seeded Gaussian noise of std `scale`.

    Float32 noise makes magnitudes effectively tie-free, which exact parity tests need.
    """
    import copy

    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.add_(noise.to(p.dtype))
    return clone


def save_model(model, tokenizer, out_dir: str | Path, max_shard_size: str | None = None) -> Path:
    """Save model (safetensors) and tokenizer as a Hugging Face directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def build_tiny_family(
    root: str | Path,
    family: str = "llama",
    n_finetunes: int = 2,
    seed: int = 0,
    num_layers: int = 4,
    tie_word_embeddings: bool = False,
    names: Sequence[str] | None = None,
    max_shard_size: str | None = None,
    **config_kwargs,
) -> tuple[Path, list[Path]]:
    """Write a tiny base model and `n_finetunes` perturbed copies under `root`.

    Returns (base_dir, [finetune_dirs]). Deterministic in `seed`.
    """
    root = Path(root)
    tok = make_tokenizer()
    cfg = tiny_config(
        family,
        vocab_size=len(tok),
        num_layers=num_layers,
        tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    base = build_tiny_model(cfg, seed=seed)
    base_dir = save_model(base, tok, root / "base", max_shard_size=max_shard_size)
    names = list(names) if names else [f"ft{i}" for i in range(n_finetunes)]
    ft_dirs = []
    for i, name in enumerate(names):
        ft = perturbed_copy(base, seed=seed * 1000 + i + 1)
        ft_dirs.append(save_model(ft, tok, root / name, max_shard_size=max_shard_size))
    return base_dir, ft_dirs


def build_tiny_adapter(base_dir: str | Path, out_dir: str | Path, seed: int = 0, scale: float = 0.1,
                       **lora_config) -> Path:
    """Save a PEFT LoRA adapter of the model in `base_dir` with seeded random factors (a trained-adapter stand-in).

    `lora_config` goes to `peft.LoraConfig` (r, lora_alpha, target_modules, use_rslora, use_dora, ...).
    Every adapter tensor (factors, DoRA magnitudes, lora_B biases, modules_to_save copies) gets
    seeded Gaussian noise of std `scale`, so that no factor is zero.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)

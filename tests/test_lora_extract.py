"""extract-lora: a full fine-tune as a PEFT adapter (randomised SVD per module, the rest saved whole)."""

import json

import pytest
import torch

from evomerge.lora import AdapterError, AdapterReader
from evomerge.lora.extract import extract_lora
from evomerge.lora.factor import low_rank
from evomerge.checkpoint import ModelReader

IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 5]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_full_rank_extraction_reproduces_the_finetune(llama_family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft = llama_family["base"], llama_family["ft0"]
    report = extract_lora(ft, base, tmp_path / "adapter", rank=64)  # >= every layer's smaller dimension
    assert min(report.energy_kept.values()) > 1 - 1e-5
    assert "model.norm" in report.saved_whole and "model.layers.0.self_attn.q_proj" in report.energy_kept
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), report.path).eval()
    expected = _logits(AutoModelForCausalLM.from_pretrained(ft).eval())
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-4)
    reader, finetune = AdapterReader(ModelReader(base), report.path), ModelReader(ft)
    for name in finetune.tensor_names():  # evomerge reads the adapter back as the fine-tune
        torch.testing.assert_close(reader.get_tensor(name), finetune.get_tensor(name), rtol=1e-4, atol=1e-5)


def test_zoo_expert_keeps_its_energy(tiny_zoo, tmp_path):
    expert = next(iter(tiny_zoo.experts.values()))
    report = extract_lora(expert, tiny_zoo.base, tmp_path / "expert", rank=24)
    assert report.overall_kept >= 0.9, report.energy_kept
    saved = json.loads((report.path / "evomerge_extract_report.json").read_text())
    assert saved["energy_kept"] == pytest.approx(report.energy_kept)


def test_low_rank_energy_is_exact_for_the_factors():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(200, 12, generator=gen) @ torch.randn(12, 150, generator=gen)
    delta += 0.05 * torch.randn(200, 150, generator=gen)
    b, a, kept = low_rank(delta, 8)
    residual = float((delta - b @ a).square().sum() / delta.square().sum())
    assert kept == pytest.approx(1 - residual, abs=1e-4) and 0.5 < kept < 1
    u, s, vh = torch.linalg.svd(delta)
    best = float(s[:8].square().sum() / s.square().sum())
    assert kept == pytest.approx(best, rel=1e-3)  # the randomised SVD finds the best subspace here


def test_bad_inputs(llama_family, qwen_family, tmp_path):
    base = llama_family["base"]
    with pytest.raises(AdapterError, match="differ|is \\["):
        extract_lora(qwen_family["ft0"], base, tmp_path / "a", rank=4)
    with pytest.raises(AdapterError, match="nothing to extract"):
        extract_lora(base, base, tmp_path / "b", rank=4)
    with pytest.raises(ValueError, match="rank"):
        extract_lora(llama_family["ft0"], base, tmp_path / "c", rank=0)
    with pytest.raises(AdapterError, match="tied"):
        extract_lora(qwen_family["ft0"], qwen_family["base"], tmp_path / "d", rank=4)
    assert list(tmp_path.iterdir()) == []


def test_extract_lora_cli(llama_family, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    args = ["extract-lora", str(llama_family["ft1"]), str(llama_family["base"]), str(tmp_path / "out"), "--rank", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mean energy kept" in result.output and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    bad = CliRunner().invoke(app, args[:-1] + ["0"])
    assert bad.exit_code == 2 and "rank must be a positive integer" in bad.output

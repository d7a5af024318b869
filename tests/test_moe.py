"""evomerge moe: config validation, router initialisations, assembly into Mixtral / Qwen2-MoE, writing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.moe import GATE_MODES, MoeError, assemble_moe, build_moe, load_moe_config
from evomerge.moe.config import MERGEKIT_GATE_MODES

PROMPTS = [["a b c d", "e f g h"], ["1 2 3 4", "5 6 7 8"], ["yes no yes", "the is of and"]]


def moe_config(family: dict[str, Path], mode: str = "router_input_mean", n: int = 3, **extra) -> dict:
    names = [k for k in family if k.startswith("ft")][:n]
    return {"base_model": str(family["base"]), "gate_mode": mode, "experts_per_token": 2,
            "experts": [{"source_model": str(family[k]), "positive_prompts": PROMPTS[i]} for i, k in enumerate(names)],
            **extra}


@pytest.fixture(scope="module")
def qwen3_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny float32 Qwen3 base and two perturbed fine-tunes (evomerge.tiny builds llama/qwen2/mistral only)."""
    from transformers import Qwen3Config

    from evomerge.tiny import build_tiny_model, make_tokenizer, perturbed_copy, save_model

    root, tok = tmp_path_factory.mktemp("qwen3"), make_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False)
    base = build_tiny_model(cfg, seed=3)
    out = {"base": save_model(base, tok, root / "base")}
    for i in range(2):
        out[f"ft{i}"] = save_model(perturbed_copy(base, seed=30 + i), tok, root / f"ft{i}")
    return out


def router_accuracy(built) -> float:
    return min(s["mean_accuracy"] for s in built.report["router_statistics"])


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("change, message", [
    ({"experts_per_token": 4}, "experts_per_token: 4 is more than the 3 experts"),
    ({"gate_mod": "random"}, "gate_mod: unknown key"),
    ({"gate_mode": "sparse"}, "gate_mode"),
    ({"non_expert": "ties"}, "non_expert"),
    ({"experts": [{"source_model": "x", "positive_prompts": []}, {"source_model": "y", "positive_prompts": ["a"]}]},
     "experts[0].positive_prompts: empty"),
    ({"experts": [{"source_model": "x", "positive_prompts": ["a"]}, {"source_model": "y", "positive_prompts": ["a"]}]},
     "every expert has the same prompts"),
    ({"experts": [{"source_model": "x"}, {"source_model": "y", "positive_prompts": ["a"]}]},
     "experts[0]: gate_mode router_input_mean needs positive_prompts"),
    ({"experts": [{"source_model": "x", "tasks": ["rev"]}, {"source_model": "y", "tasks": ["map"]}]},
     "needs a top-level 'calibration"),
    ({"experts": [{"source_model": "x", "positive_prompts": ["a"], "noise_scale": 0.1},
                  {"source_model": "y", "positive_prompts": ["b"]}]}, "noise_scale: not supported"),
])
def test_bad_configs_are_refused_naming_the_key(llama_family, change, message):
    with pytest.raises(MoeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_moe_config({**moe_config(llama_family), **change})


def test_data_free_modes_need_no_prompts(llama_family):
    cfg = load_moe_config({"base_model": "b", "gate_mode": "random", "experts_per_token": 1,
                           "experts": [{"source_model": "x"}, {"source_model": "y"}]})
    assert cfg.experts_per_token == 1 and cfg.seed == 0


def test_models_that_cannot_form_one_moe_are_refused_before_loading(llama_family, qwen_family, tmp_path):
    mixed = moe_config(llama_family)
    mixed["experts"][1]["source_model"] = str(qwen_family["ft0"])
    with pytest.raises(MoeError, match=r"experts\[1\].source_model: .* is a qwen2 model, the base is llama"):
        build_moe(mixed, tmp_path / "out")
    with pytest.raises(MoeError, match="architecture: deepseek: DeepSeek-MoE needs trust_remote_code"):
        build_moe({**moe_config(llama_family), "architecture": "deepseek"}, tmp_path / "out")
    with pytest.raises(MoeError, match="shared_experts: only the qwen architecture"):
        build_moe({**moe_config(llama_family), "shared_experts": [{"source_model": str(llama_family["base"])}]},
                  tmp_path / "out")
    with pytest.raises(MoeError, match=r"experts\[0\].source_model: .*not a readable model directory"):
        build_moe({**moe_config(llama_family), "experts": [{"source_model": str(tmp_path), "positive_prompts": ["a"]},
                                                           *moe_config(llama_family)["experts"][1:]]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_experts_with_another_shape_or_tokenizer_are_refused(llama_family, tmp_path):
    from evomerge.tiny import build_tiny_family

    _, (wide,) = build_tiny_family(tmp_path / "wide", n_finetunes=1, num_layers=4, hidden_size=48)
    cfg = moe_config(llama_family)
    cfg["experts"][0]["source_model"] = str(wide)
    with pytest.raises(MoeError, match=r"experts\[0\].source_model: hidden_size is 48, the base's is 32"):
        build_moe(cfg, tmp_path / "out")
    other_tok = tmp_path / "other_tok"
    import shutil

    shutil.copytree(llama_family["ft0"], other_tok)
    from evomerge.tiny import make_tokenizer

    make_tokenizer(["x", "y", "z"]).save_pretrained(other_tok)
    cfg = moe_config(llama_family)
    cfg["experts"][0]["source_model"] = str(other_tok)
    with pytest.raises(MoeError, match="tokenizer's vocabulary differs"):
        build_moe(cfg, tmp_path / "out")


# ------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("mode", GATE_MODES)
def test_every_gate_mode_builds_reloads_and_generates(llama_family, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    out = build_moe(moe_config(llama_family, mode), tmp_path / mode)
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = yaml.safe_load((out / "moe_report.json").read_text())
    assert report["reload_max_logit_difference"] <= 1e-5
    gen = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    assert (out / "moe.yaml").is_file() and (out / "README.md").is_file()
    assert (out / "mergekit_moe.yaml").is_file() == (mode in MERGEKIT_GATE_MODES)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left


def dense_hybrid(family, expert: str, dtype=torch.float32):
    """The base model with expert ``expert``'s MLPs: what an MoE routing every slot to that expert computes."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(family["base"], dtype=dtype)
    donor = AutoModelForCausalLM.from_pretrained(family[expert], dtype=dtype)
    for lb, ld in zip(base.model.layers, donor.model.layers):
        lb.mlp.load_state_dict(ld.mlp.state_dict())
    return base.eval()


@pytest.mark.parametrize("family_name", ["llama_family", "qwen_family", "qwen3_family"])
def test_routing_every_slot_to_one_expert_reproduces_the_dense_hybrid(request, family_name):
    family = request.getfixturevalue(family_name)
    ids = torch.tensor([[4, 9, 17, 30, 2, 8]])
    for e, name in enumerate(["ft0", "ft1"]):
        built = assemble_moe(moe_config(family, "random", n=2))
        with torch.no_grad():
            for block in built.moe.blocks():  # every slot holds expert e: routing cannot matter
                for p in (block.experts.gate_up_proj, block.experts.down_proj):
                    p.copy_(p[e].clone().expand_as(p))
            got = built.moe.model(input_ids=ids).logits
            want = dense_hybrid(family, name)(input_ids=ids).logits
        assert (got - want).abs().max().item() < 1e-5


def test_qwen2_moe_with_and_without_a_shared_expert(qwen_family, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = build_moe(moe_config(qwen_family, "zero", n=2), tmp_path / "plain")
    shared = build_moe({**moe_config(qwen_family, "zero", n=2), "shared_experts": [{"source_model": str(qwen_family["base"])}]},
                       tmp_path / "shared")
    for out in (plain, shared):
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
        assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.tie_word_embeddings
    built = assemble_moe(moe_config(qwen_family, "zero", n=2))  # no shared expert: a zero MLP adds nothing
    assert built.moe.model.model.layers[0].mlp.shared_expert.down_proj.weight.abs().sum() == 0
    recipe = tmp_path / "shared.yaml"  # a merged MLP as the shared expert
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(qwen_family["ft0"]), "parameters": {"weight": 0.5}},
        {"model": str(qwen_family["ft1"]), "parameters": {"weight": 0.5}}]}))
    built = assemble_moe({**moe_config(qwen_family, "zero", n=2), "shared_experts": [{"source_model": str(recipe)}]})
    from evomerge.checkpoint import ModelReader

    name = "model.layers.2.mlp.up_proj.weight"
    with ModelReader(qwen_family["ft0"]) as a, ModelReader(qwen_family["ft1"]) as b:
        want = (a.get_tensor(name) + b.get_tensor(name)) / 2
    assert torch.allclose(built.moe.model.model.layers[2].mlp.shared_expert.up_proj.weight, want, atol=1e-7)


def test_qwen3_moe_output(qwen3_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = build_moe(moe_config(qwen3_family, "supervised", n=2), tmp_path / "q3")
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen3MoeForCausalLM"


def test_non_expert_weights_from_the_experts_average(llama_family):
    from evomerge.checkpoint import ModelReader

    built = assemble_moe({**moe_config(llama_family, "zero", n=2), "non_expert": "average"})
    name = "model.layers.1.self_attn.q_proj.weight"
    with ModelReader(llama_family["ft0"]) as a, ModelReader(llama_family["ft1"]) as b:
        want = (a.get_tensor(name) + b.get_tensor(name)) / 2
    assert torch.allclose(built.moe.model.state_dict()[name], want, atol=1e-7)


def test_same_seed_gives_byte_identical_files(llama_family, tmp_path):
    cfg = {**moe_config(llama_family, "random"), "seed": 7}
    a, b = build_moe(cfg, tmp_path / "a"), build_moe(cfg, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = build_moe({**cfg, "seed": 8}, tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("mode", ["random", "uniform_random", "cheap_embed", "hidden_last", "hidden_avg"])
def test_router_tensors_match_mergekit_moe(llama_family, mode):
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params

    from evomerge.moe.build import load_tokenizer

    cfg = {**moe_config(llama_family, mode), "seed": 3}
    cfg["experts"][0]["negative_prompts"] = ["yes yes", "a"]
    ours = assemble_moe(cfg).moe.router_weights()
    torch.manual_seed(3)  # mergekit-moe draws from the global generator
    theirs = get_gate_params(ModelReference.parse(str(llama_family["base"])), load_tokenizer(str(llama_family["base"])),
                             [Expert(**e) for e in cfg["experts"]], mode=mode, device="cpu").float()
    assert ours.shape == theirs.shape == (4, 3, 32)
    if mode == "cheap_embed":  # mergekit sums by a one-hot matmul: same values up to float32 rounding
        assert torch.allclose(ours, theirs, atol=1e-6)
    else:
        assert torch.equal(ours, theirs)


def test_existing_output_is_kept_and_a_failed_write_leaves_nothing(llama_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MoeError, match="exists; pass overwrite"):
        build_moe(moe_config(llama_family, "zero"), out)
    import evomerge.moe.write as write

    monkeypatch.setattr(write, "reload_difference", lambda moe, path: 1.0)
    with pytest.raises(MoeError, match="logits differ from the in-memory model's by 1"):
        build_moe(moe_config(llama_family, "zero"), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_builds_and_reports_bad_input(llama_family, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    good = tmp_path / "moe.yaml"
    good.write_text(yaml.safe_dump(moe_config(llama_family, "zero")))
    res = CliRunner().invoke(app, ["moe", str(good), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "config.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**moe_config(llama_family), "experts_per_token": 9}))
    res = CliRunner().invoke(app, ["moe", str(bad), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "experts_per_token" in res.output


# ------------------------------------------------------------------------------------------- routing on the zoo


@pytest.fixture(scope="module")
def zoo_moe_config(tiny_zoo):
    return {"base_model": str(tiny_zoo.base), "experts_per_token": 2,
            "calibration": {"tasks": str(tiny_zoo.tasks_yaml), "split": "search", "examples": 32},
            "experts": [{"source_model": str(p), "tasks": [name]} for name, p in tiny_zoo.experts.items()]}


def test_data_driven_routers_send_calibration_tokens_to_their_expert(zoo_moe_config):
    acc = {mode: router_accuracy(assemble_moe({**zoo_moe_config, "gate_mode": mode}))
           for mode in ("supervised", "router_input_mean", "router_input_lda", "hidden", "random")}
    assert acc["supervised"] >= 0.95 and acc["router_input_lda"] >= 0.95  # the target: >= 90%
    assert acc["router_input_mean"] >= 0.85 > acc["random"]
    assert acc["router_input_mean"] > acc["hidden"]


# ------------------------------------------------------------------------------------------- router training


def test_top1_routing_gives_the_router_no_gradient_but_top2_does(llama_family):
    from evomerge.moe.activations import encode
    from evomerge.moe.train import lm_loss

    built = assemble_moe({**moe_config(llama_family, "random"), "experts_per_token": 1})
    batch = encode(built.tokenizer, [t for p in PROMPTS for t in p], 32)
    norms = {}
    for k in (1, 2):
        for b in built.moe.blocks():
            b.gate.top_k = k
            b.gate.weight.requires_grad_(True)
            b.gate.weight.grad = None
        lm_loss(built.moe.model, batch).backward()
        norms[k] = sum(b.gate.weight.grad.norm().item() for b in built.moe.blocks())
    assert norms[1] < 1e-6 < 1e-3 < norms[2]


def test_router_training_lowers_the_calibration_loss(llama_family):
    built = assemble_moe({**moe_config(llama_family, "random"), "train": {"steps": 40, "lr": 0.05}})
    t = built.report["training"]
    assert t["top_k"] == 2 and t["trained_parameters"] == 4 * 3 * 32
    assert t["loss_after"] < t["loss_before"]
    assert built.moe.model.model.embed_tokens.weight.requires_grad is False


def test_soft_routing_and_norm_training(llama_family):
    base = assemble_moe(moe_config(llama_family, "random"))
    built = assemble_moe({**moe_config(llama_family, "random"),
                          "train": {"steps": 10, "lr": 0.05, "soft": True, "norms": True}})
    t = built.report["training"]
    assert t["top_k"] == 3 and t["trained_parameters"] == 4 * 3 * 32 + (2 * 4 + 1) * 32
    assert t["loss_after"] < t["loss_before"]
    name = "model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(built.moe.model.state_dict()[name], base.moe.model.state_dict()[name])
    assert built.moe.blocks()[0].gate.top_k == 2


def test_top1_training_switches_to_top2_with_a_message(llama_family):
    messages = []
    cfg = {**moe_config(llama_family, "zero"), "experts_per_token": 1, "train": {"steps": 20, "lr": 0.05}}
    built = assemble_moe(cfg, log=messages.append)
    assert any("no gradient" in m and "top-2" in m for m in messages)
    assert built.report["training"]["top_k"] == 2
    assert built.moe.blocks()[0].gate.top_k == 1  # inference keeps the configured top-1
    assert built.moe.router_weights().abs().sum() > 0  # the zero routers moved


def test_supervised_routing_loss_keeps_routing_accurate(zoo_moe_config):
    cfg = {**zoo_moe_config, "gate_mode": "zero", "train": {"steps": 30, "lr": 0.05, "supervised": 1.0}}
    assert router_accuracy(assemble_moe(cfg)) >= 0.9


def test_non_expert_weights_from_a_dense_recipe(llama_family, tmp_path):
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(llama_family["ft0"]), "parameters": {"weight": 0.5}},
        {"model": str(llama_family["ft1"]), "parameters": {"weight": 0.5}}]}))
    via_recipe = assemble_moe({**moe_config(llama_family, "zero", n=2), "non_expert": str(recipe)})
    averaged = assemble_moe({**moe_config(llama_family, "zero", n=2), "non_expert": "average"})
    a, b = via_recipe.moe.model.state_dict(), averaged.moe.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": "nowhere"}]}))
    with pytest.raises(MoeError, match=r"non_expert \(.*linear.yaml\): base_model: method .ties. requires a base model"):
        assemble_moe({**moe_config(llama_family, "zero", n=2), "non_expert": str(recipe)})


def test_the_moe_is_scored_beside_base_experts_and_a_dense_merge(zoo_moe_config, tiny_zoo, tmp_path):
    experts = [str(p) for p in tiny_zoo.experts.values()]
    cfg = {**zoo_moe_config, "gate_mode": "supervised",
           "evaluate": {"tasks": str(tiny_zoo.tasks_yaml), "split": "validation", "gate_modes": ["zero"],
                        "bootstrap_iters": 50,
                        "dense": {"linear": {"merge_method": "linear", "dtype": "float32",
                                             "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]}}}}
    out = build_moe(cfg, tmp_path / "moe")
    report = yaml.safe_load((out / "moe_report.json").read_text())
    rows = {r["label"]: r for r in report["comparison"]}
    assert list(rows) == ["base", "expert 0 (rev)", "expert 1 (map)", "expert 2 (cmp)", "linear", "moe supervised",
                          "moe zero"]
    moe, base = rows["moe supervised"], rows["base"]
    assert base["active_parameters"] < moe["active_parameters"] < moe["total_parameters"]
    assert all(r["ci"][0] <= r["aggregate"] <= r["ci"][1] for r in rows.values())
    assert "| moe zero |" in (out / "README.md").read_text()
    # scoring other router inits leaves the written MoE with its own (supervised) routers
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    own = assemble_moe({k: v for k, v in cfg.items() if k != "evaluate"}).moe.router_weights()
    assert torch.equal(written["model.layers.1.block_sparse_moe.gate.weight"], own[1])


# ------------------------------------------------------------------------------------------- search


def test_a_short_moe_search_beats_its_first_trial_and_its_output_rebuilds(zoo_moe_config, tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {**zoo_moe_config, "gate_mode": "random",
           "search": {"tasks": str(tiny_zoo.tasks_yaml), "trials": 8,
                      "gate_modes": ["random", "zero", "router_input_mean", "supervised"], "experts_per_token": [1, 2]}}
    out = build_moe(cfg, tmp_path / "searched")
    report = yaml.safe_load((out / "moe_report.json").read_text())
    trials = report["search"]["trials"]
    assert len(trials) == 8 and trials[0]["params"]["gate_mode"] == "random"
    assert all(trials[0]["params"][f"w{i}"] == 0.0 for i in range(3))  # the first trial is the config's own
    assert max(t["score"] for t in trials) > trials[0]["score"]
    finalists = [t for t in trials if t["validation"] is not None]
    assert len(finalists) == 3  # the winner is the best of the three best on the validation split
    assert report["search"]["best"] == max(finalists, key=lambda t: t["validation"])["params"]
    written = yaml.safe_load((out / "moe.yaml").read_text())
    assert "search" not in written and written["non_expert"] == "non_expert_recipe.yaml"
    assert written["gate_mode"] == report["search"]["best"]["gate_mode"]
    again = build_moe(out / "moe.yaml", tmp_path / "rebuilt")  # the written config reproduces the winner
    ids = torch.tensor([[5, 40, 41, 42, 60, 61]])
    a, b = (AutoModelForCausalLM.from_pretrained(p)(input_ids=ids).logits for p in (out, again))
    assert (a - b).abs().max().item() < 1e-4


def test_search_options_are_checked(zoo_moe_config, tiny_zoo):
    with pytest.raises(MoeError, match=r"search.experts_per_token: \[4\] outside 1..3"):
        load_moe_config({**zoo_moe_config, "search": {"tasks": "t.yaml", "experts_per_token": [2, 4]}})
    with pytest.raises(MoeError, match="search.tasks: "):
        assemble_moe({**zoo_moe_config, "search": {"tasks": "missing.yaml"}})
    with pytest.raises(MoeError, match="evaluate.dense.ties: "):
        assemble_moe({**zoo_moe_config, "evaluate": {"tasks": str(tiny_zoo.tasks_yaml),
                                                     "dense": {"ties": {"merge_method": "ties", "models": []}}}})
    with pytest.raises(MoeError, match="search.trail: unknown key"):
        load_moe_config({**zoo_moe_config, "search": {"tasks": "t.yaml", "trail": 3}})


def test_bfloat16_output_reloads_exactly(llama_family, tmp_path):
    """The in-memory model matches what transformers loads (a model cast to bf16 after building would have
    rounded rotary buffers, which from_pretrained keeps in float32)."""
    from transformers import AutoModelForCausalLM

    out = build_moe({**moe_config(llama_family, "router_input_mean"), "dtype": "bfloat16"}, tmp_path / "bf16")
    report = yaml.safe_load((out / "moe_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["reload_max_logit_difference"] == 0.0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16

"""A search whose fine-tunes are LoRA adapters: run config models may be adapter directories."""

import torch
import yaml

from evomerge.lora.extract import extract_lora
from tests.conftest import read_weights


def test_search_over_adapters_runs_and_exports(tiny_zoo, tmp_path):
    from evomerge.engine import iter_merged, plan_merge
    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun
    from tests.test_search import SPACES

    adapters = {name: str(extract_lora(path, tiny_zoo.base, tmp_path / "adapters" / name, rank=8).path)
                for name, path in tiny_zoo.experts.items()}
    cfg = {"name": "lora", "base_model": str(tiny_zoo.base), "models": adapters, "tasks": str(tiny_zoo.tasks_yaml),
           "search_space": str(SPACES / "ties_per_model.yaml"), "budget": {"trials": 4},
           "sampler": {"name": "random"}, "pruner": {"name": "none"}, "output_dir": str(tmp_path / "run"),
           "device": "cpu", "top_k": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = SearchRun(load_config(tmp_path / "run.yaml"))
    run.run()
    finalize(run)
    exported = yaml.safe_load((tmp_path / "run" / "best_recipe.yaml").read_text())
    assert {m["model"] for m in exported["models"]} == {f"{tiny_zoo.base}+{a}" for a in adapters.values()}  # mergekit's form
    assert yaml.safe_load((tmp_path / "run" / "merged" / "mergekit_config.yml").read_text())["models"] == exported["models"]
    merged = read_weights(tmp_path / "run" / "merged")
    for name, tensor in iter_merged(plan_merge(tmp_path / "run" / "best_recipe.yaml"), device="cpu"):
        assert torch.equal(merged[name], tensor), name

"""Model cards: YAML metadata the Hub reads (checked with huggingface_hub's own parsers), recipe, results."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from evomerge.card import ScoreRow, is_hub_id, merge_facts, render_card
from evomerge.recipe import load_recipe

HUB_RECIPE = """
merge_method: ties
base_model: meta-llama/Llama-3.1-8B
models:
  - model: org/math-ft
    parameters: {weight: 0.6, density: 0.5}
  - model: org/code-ft
    parameters: {weight: 0.4, density: 0.5}
parameters: {normalize: true}
dtype: bfloat16
name: my-merge
"""


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert is_hub_id("org/name") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./rel/dir") and not is_hub_id("a/b/c")


def test_a_searched_merge_card_has_the_metadata_the_hub_reads(tmp_path):
    rows = [ScoreRow("winner (trial 7)", 0.7, (0.65, 0.75), {"rev": 0.9, "cmp": 0.5}),
            ScoreRow("base", 0.3, (0.25, 0.35), {"rev": 0.2, "cmp": 0.4})]
    facts = merge_facts(load_recipe(HUB_RECIPE), num_layers=32, seed=3, how=["Found by a search."], results=rows,
                        metrics={"rev": "exact_match", "cmp": "acc"})
    path = tmp_path / "README.md"
    path.write_text(render_card(facts))
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model == ["meta-llama/Llama-3.1-8B", "org/math-ft", "org/code-ft"]
    assert data.tags == ["merge", "evomerge", "mergekit"]
    # the model-index, as the Hub's parser reads it back: one result per task on the test split
    name, results = model_index_to_eval_results(metadata_load(path)["model-index"])
    assert name == "my-merge"
    got = {(r.dataset_name, r.metric_type, r.dataset_split): r.metric_value for r in results}
    assert got == {("rev", "exact_match", "test"): 0.9, ("cmp", "acc", "test"): 0.5}
    text = card.text
    for section in ("## Source models", "## How it was made", "## Test results", "## Recipe", "## Limitations"):
        assert section in text
    assert "| winner (trial 7) | 0.700 | [0.650, 0.750] | 0.900 | 0.500 |" in text
    assert "merge_method: ties" in text and "Found by a search." in text


def test_a_method_mergekit_cannot_run_drops_the_mergekit_tag():
    facts = merge_facts(load_recipe(HUB_RECIPE), num_layers=32, seed=0)
    facts.mergekit_runnable = False
    card = ModelCard(render_card(facts))
    assert card.data.tags == ["merge", "evomerge"] and card.data.eval_results is None


def test_evomerge_merge_writes_a_card_the_hub_parser_accepts(llama_family, tmp_path):
    """A plain merge of local models: the metadata parses, local paths stay out of base_model (the Hub would
    reject them) and are named in the text."""
    from evomerge.engine import run_merge

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {llama_family['base']}\nmodels:\n"
                      f"  - model: {llama_family['ft0']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {llama_family['ft1']}\n    parameters: {{weight: 0.5}}\n")
    out = run_merge(recipe, tmp_path / "out", device="cpu")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert card.data.tags == ["merge", "evomerge", "mergekit"]
    assert f"`{llama_family['ft1']}` (local directory)" in card.text
    assert f"`{llama_family['base']}` (base) (local directory)" in card.text


@pytest.mark.parametrize("bad", ["---\nlibrary_name: [\n---\n", "no front matter"])
def test_the_parser_used_above_rejects_broken_metadata(bad, tmp_path):
    """The checks above can fail: huggingface_hub refuses YAML that does not parse (and finds no metadata
    where there is none)."""
    path = tmp_path / "README.md"
    path.write_text(bad)
    if bad.startswith("---"):
        with pytest.raises(Exception):
            ModelCard.load(path)
    else:
        assert metadata_load(path) is None

"""Model cards (``README.md``) for every checkpoint evomerge writes, with metadata the Hugging Face Hub reads.

The YAML front matter follows the Hub's model-card specification, built with ``huggingface_hub``'s
``ModelCardData`` and ``EvalResult``: ``base_model`` (the models it was made from that are Hub
repo ids; local directories are named in the text instead, since the Hub would reject a path),
``library_name: transformers``, ``tags`` (``merge`` and ``evomerge``, and ``mergekit`` where the
recipe runs in mergekit, as mergekit's own cards are tagged) and a ``model-index`` with the test
results (one entry per task: its metric on the test split). The body gives the recipe, how it was
found (for a search: the space, sampler, trials and the test table beside the baselines) and the
limitations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from evomerge.recipe import mergekit_note

USAGE_PLACEHOLDER = "PATH_OR_REPO_ID"  # the usage snippet's model id; `evomerge push` puts the repo id there

LIMITATIONS = [
    "The scores above come from the tasks this model was searched and tested on; they say nothing about "
    "other tasks, safety or factuality, which were not evaluated.",
    "Merging combines what the source models learned, including their biases and failure modes; read "
    "their model cards and licenses, which apply to this model too.",
]


@dataclass
class ScoreRow:
    """One line of a test table: a model's aggregate score, its 95% CI, its per-task scores and, for a
    search's finalists, its validation score."""

    label: str
    aggregate: float
    ci: tuple[float, float] | None
    per_task: dict[str, float]
    validation: float | None = None


@dataclass
class CardFacts:
    """What a card says about one checkpoint."""

    title: str
    sources: list[str]  # every model it was made from, base first where there is one
    base: str | None = None
    method: str | None = None  # the merge method, when the checkpoint is a merge
    method_text: str = ""  # e.g. "**TIES** (arXiv:2306.01708)"
    recipe_yaml: str | None = None
    mergekit_runnable: bool = False  # the checkpoint is exactly what mergekit makes of the recipe
    how: list[str] = field(default_factory=list)  # markdown paragraphs: how it was made or found
    results: list[ScoreRow] = field(default_factory=list)  # the test table; row 0 is this checkpoint
    metrics: dict[str, str] = field(default_factory=dict)  # task -> metric name
    limitations: list[str] = field(default_factory=lambda: list(LIMITATIONS))


def is_hub_id(ref: str) -> bool:
    """Whether a model reference is a Hub repo id ("org/name", or "name") rather than a local directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.startswith((".", "/", "~")) or Path(ref).exists():
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def card_data(facts: CardFacts):
    """The card's metadata as ``huggingface_hub.ModelCardData`` (base_model, library, tags, model-index)."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["evomerge"]
    if facts.method:
        tags.insert(0, "merge")
        if facts.mergekit_runnable:
            tags.append("mergekit")
    hub = [m for m in facts.sources if is_hub_id(m)]
    results = []
    if facts.results:
        mine = facts.results[0]
        for task, score in mine.per_task.items():
            metric = facts.metrics.get(task, "score")
            results.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                      dataset_type=task, dataset_name=task, dataset_split="test",
                                      metric_type=metric, metric_name=f"{metric} ({task}, test split)",
                                      metric_value=round(float(score), 4)))
    return ModelCardData(base_model=hub or None, library_name="transformers", tags=tags,
                         pipeline_tag="text-generation", model_name=facts.title,
                         eval_results=results or None)


def render_card(facts: CardFacts) -> str:
    """The whole README.md: YAML front matter (``card_data``) and the markdown body."""
    data = card_data(facts)
    body = [f"# {facts.title}", ""]
    if facts.method:
        body += [f"This model is a merge made with evomerge using the "
                 f"{facts.method_text or facts.method} method." + (" The recipe is mergekit-compatible: "
                 "[mergekit](https://github.com/arcee-ai/mergekit) builds the same model from it."
                 if facts.mergekit_runnable else " Note: " + (mergekit_note(facts.method) or "")), ""]
    body += ["## Source models", ""]
    for m in facts.sources:
        where = "Hub" if is_hub_id(m) else "local directory"
        body.append(f"- `{m}`" + (" (base)" if m == facts.base else "") + f" ({where})")
    body.append("")
    if facts.how:
        body += ["## How it was made", "", *[p for para in facts.how for p in (para, "")]]
    if facts.results:
        body += ["## Test results", "", *score_table(facts.results), ""]
    if facts.recipe_yaml:
        body += ["## Recipe", "", "`mergekit_config.yml`:" if facts.mergekit_runnable else "The recipe:", "",
                 "```yaml", facts.recipe_yaml.rstrip(), "```", ""]
    body += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{USAGE_PLACEHOLDER}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_PLACEHOLDER}")', "```", ""]
    body += ["## Limitations", "", *[f"- {x}" for x in facts.limitations], ""]
    return "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)


def score_table(rows: Sequence[ScoreRow]) -> list[str]:
    """A markdown table of test scores: aggregate with 95% CI, then each task."""
    tasks = list(rows[0].per_task)
    lines = ["| model | aggregate | 95% CI | " + " | ".join(tasks) + " |", "|---|---:|---|" + "---:|" * len(tasks)]
    for r in rows:
        ci = "" if r.ci is None else f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
        lines.append(f"| {r.label} | {r.aggregate:.3f} | {ci} | "
                     + " | ".join(f"{r.per_task.get(t, float('nan')):.3f}" for t in tasks) + " |")
    return lines


def task_metrics(task_specs) -> dict[str, str]:
    """{task: the name of the metric it is scored with} ("acc" of an lm-eval "acc,none")."""
    return {s.name: str(s.metric).split(",", 1)[0] for s in task_specs}


def merge_facts(recipe, *, num_layers: int, seed: int, how: Sequence[str] = (),
                results: Sequence[ScoreRow] = (), metrics: dict[str, str] | None = None) -> CardFacts:
    """The facts of a merged checkpoint: its recipe, method and sources, plus how it was found if searched."""
    from evomerge.methods import METHODS

    method = METHODS[recipe.merge_method]
    base = recipe.base_model
    sources = ([base] if base else []) + [m for m in recipe.referenced_models() if m != base]
    made = [f"Output layers: {num_layers}. Random seed (DARE/DELLA masks): {seed}."]
    return CardFacts(title=recipe.name or "Merged model", sources=sources, base=base, method=method.name,
                     method_text=f"**{method.pretty_name}** ({method.reference})", recipe_yaml=recipe.to_yaml(),
                     mergekit_runnable=method.in_mergekit, how=[*how, *made],
                     results=list(results), metrics=dict(metrics or {}))


def finetune_facts(source_dir: Path, *, title: str, how: Sequence[str], before: ScoreRow, after: ScoreRow,
                   metrics: dict[str, str]) -> CardFacts:
    """The facts of a fine-tuned checkpoint: the model it started from, what was trained, test before/after.

    A fine-tuned merge keeps the ``merge`` and ``evomerge`` tags and its recipe for reference, without
    ``mergekit`` (mergekit does not make the fine-tuned weights)."""
    recipe_file = source_dir / "mergekit_config.yml"
    recipe = recipe_file.read_text() if recipe_file.is_file() else None
    method = None
    if recipe is not None:
        import yaml

        method = (yaml.safe_load(recipe) or {}).get("merge_method")
    return CardFacts(title=title, sources=[str(source_dir)], base=str(source_dir), method=method,
                     method_text=f"`{method}`" if method else "", recipe_yaml=recipe, mergekit_runnable=False,
                     how=list(how), results=[after, before], metrics=metrics)

"""`evomerge push`: the files it would upload, and clean errors offline or without a token (no network)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.push import PushError, plan_upload, push


@pytest.fixture(scope="module")
def merged(llama_family, tmp_path_factory):
    """A plain merge of the tiny Llama family, with a stray temporary file and lock beside its files."""
    from evomerge.engine import run_merge

    tmp = tmp_path_factory.mktemp("push")
    recipe = tmp / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n"
                      + "".join(f"  - model: {llama_family[k]}\n    parameters: {{weight: 1}}\n" for k in ("ft0", "ft1")))
    out = run_merge(recipe, tmp / "model", device="cpu")
    (out / ".README.md.123.tmp").write_text("half written")
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_model_directory_uploads_its_files_and_no_hidden_ones(merged):
    plan = {u.path_in_repo for u in plan_upload(merged)}
    assert {"README.md", "config.json", "mergekit_config.yml", "model.safetensors"} <= plan
    assert not [p for p in plan if p.startswith(".")]
    assert plan == {p.name for p in merged.iterdir() if not p.name.startswith(".")}


def test_an_incomplete_or_missing_directory_is_refused(merged, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PushError, match="missing README.md, \\*.safetensors"):
        plan_upload(tmp_path)
    with pytest.raises(PushError, match="no such directory"):
        plan_upload(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text("name: x\n")
    with pytest.raises(PushError, match="wrote no checkpoint"):
        plan_upload(run)


def test_offline_push_fails_cleanly_before_reading_anything(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE: the error says so (the directory does not even exist: nothing was read)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    res = CliRunner().invoke(app, ["push", str(tmp_path / "absent"), "--repo-id", "me/model"])
    assert res.exit_code == 2
    assert "HF_HUB_OFFLINE is set" in _one_line(res.output) and "Traceback" not in res.output
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(tmp_path / "absent", "me/model")


def test_push_without_a_token_fails_cleanly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    res = CliRunner().invoke(app, ["push", str(tmp_path / "absent"), "--repo-id", "me/model"])
    assert res.exit_code == 2 and "no Hugging Face token" in _one_line(res.output)


def test_dry_run_lists_the_plan_and_checks_the_repo_id(merged):
    res = CliRunner().invoke(app, ["push", str(merged), "--repo-id", "me/model", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"README.md  <-  {merged / 'README.md'}" in res.output
    res = CliRunner().invoke(app, ["push", str(merged), "--repo-id", "not a repo id!", "--dry-run"])
    assert res.exit_code == 2 and "--repo-id" in res.output


def test_the_uploaded_card_names_the_repository(merged):
    from evomerge.card import USAGE_PLACEHOLDER
    from evomerge.push import Upload, upload_content

    text = upload_content(Upload("README.md", merged / "README.md"), "me/model").decode()
    assert USAGE_PLACEHOLDER in (merged / "README.md").read_text()
    assert 'from_pretrained("me/model")' in text and USAGE_PLACEHOLDER not in text

"""The one finish of a study: which worker finalizes, and finalizing by hand (``evomerge finalize``).

When a worker's loop ends (the budget spent), it waits until no trial of the study is running, then
tries to claim the finalize (``workers.claim_finalize``): exactly one worker wins and finalizes, every
other one says who does and exits. ``evomerge finalize RUN_DIR`` (or ``--storage URL --study-name X``)
finalizes by hand at any time, e.g. when the claiming worker died; finalizing again rewrites the same
files whole (``export.write_atomic``), so it is idempotent.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

import yaml

from evomerge.search.workers import claim_finalize, worker_id

CONFIG_ATTR = "config"  # the study's user attribute with the creating worker's run config (no storage URL)


def claim_or_report(run, log: Callable[[str], None]) -> bool:
    """Wait for running trials to end, then claim the finalize: True when this worker should finalize;
    False after saying which worker does."""
    from evomerge.search.run import budget_count

    running = run.running_trials()
    if running:
        log(f"waiting for {len(running)} running trial(s) of other workers before finalizing")
    run.wait_for_running()
    holder = claim_finalize(run.study, budget_count(run.study))
    if holder is None:
        return True
    done = run.study.user_attrs.get("finalized")
    if done and done.get("by") == holder:
        log(f"finalize: already done by {holder} at {done.get('at')} (winner: trial {done.get('winner_trial')}); "
            f"`evomerge finalize` redoes it")
    else:
        log(f"finalize: {holder} finalizes this study; this worker stops here")
    return False


def mark_finalized(run, winner_trial: int) -> None:
    """Record in the study who finalized it, when, and the winner (``evomerge status`` shows it)."""
    run.study.set_user_attr("finalized", {"by": worker_id(), "winner_trial": winner_trial,
                                          "at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                              timespec="seconds")})


def stored_config(cfg) -> str:
    """The run config as kept in the study: YAML without the storage URL (it may hold a password)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"}), sort_keys=False)


def run_for_finalize(run_dir: Path | None, *, storage: str | None, study_name: str | None,
                     output_dir: Path | None):
    """A ``SearchRun`` for finalizing a study: its config from ``RUN_DIR/run_config.yaml``, else from the
    study itself (what the first worker stored), with the storage, study name and output directory given."""
    from evomerge.search.config import RunConfig
    from evomerge.search.run import SearchRun

    data = None
    if run_dir is not None:
        path = Path(run_dir) / "run_config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a search run directory (no run_config.yaml)")
        data = yaml.safe_load(path.read_text())
        data["output_dir"] = str(Path(run_dir).resolve())
    elif storage is None or study_name is None:
        raise ValueError("give a run directory, or --storage and --study-name")
    if storage is not None:
        from evomerge.search.config import resolve_storage

        storage = resolve_storage(storage, Path.cwd())
    if data is None:
        data = yaml.safe_load(_study_config(storage, study_name))
    if storage is not None:
        data["storage"] = storage
    if study_name is not None:
        data["study_name"] = study_name
    if output_dir is not None:
        data["output_dir"] = str(Path(output_dir).resolve())
    return SearchRun(RunConfig.model_validate(_without_defaults(data)))


def _without_defaults(data: dict) -> dict:
    """A saved (fully dumped) config made loadable again: sampler and pruner options left at their defaults are
    dropped, since the config refuses an option set for a sampler or pruner that does not use it."""
    from evomerge.search.config import Pruner, Sampler

    data = dict(data)
    for key, model in (("sampler", Sampler), ("pruner", Pruner)):
        if isinstance(data.get(key), dict):
            data[key] = {k: v for k, v in data[key].items()
                         if k == "name" or k not in model.model_fields or v != model.model_fields[k].default}
    return data


def _study_config(storage: str, study_name: str) -> str:
    """The run config stored in a study by the worker that created it."""
    import optuna

    from evomerge.search.study import make_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage, Path.cwd()))
    except KeyError:
        raise KeyError(f"no study named {study_name!r} in that storage") from None
    text = study.user_attrs.get(CONFIG_ATTR)
    if text is None:
        raise ValueError(f"study {study_name!r} has no stored run config (made by an older evomerge); "
                         f"pass its run directory instead")
    return text

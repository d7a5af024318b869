"""A trial's parameters and user attributes, sent to the study's storage as one write.

Optuna commits every ``suggest_*`` and every ``set_user_attr`` on its own: one transaction on a database,
one locked, fsync'ed append on the journal file. A trial of a per-layer search space suggests dozens of
parameters, so most of a trial's storage time went to those single writes. Inside ``held_writes(storage)``
the calling thread's ``set_trial_param`` and ``set_trial_user_attr`` calls are held, and at the end of the
block they are sent together: one transaction (``RDBStorage``), one append (``JournalStorage``). Other
threads (the heartbeat) write straight through. A block that raises sends nothing.

The storages ``make_storage`` opens hold writes (``HeldJournalStorage``, and the database class in
``study.py``); any other storage writes straight through, so the block is always safe to use.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

from optuna.storages import BaseStorage, JournalStorage

_LOCAL = threading.local()  # per thread: {id(storage): list of held writes}


def holding(storage: Any) -> list | None:
    """The calling thread's list of writes held for ``storage``, or None when it holds none."""
    return getattr(_LOCAL, "held", {}).get(id(storage))


@contextmanager
def held_writes(storage: BaseStorage):
    """Hold this thread's parameter and user-attribute writes to ``storage`` (a study's ``_storage``; Optuna's
    cache in front of a database is looked through) and send them as one write when the block ends."""
    target = storage if hasattr(storage, "send_held") else getattr(storage, "_backend", storage)
    if not hasattr(target, "send_held") or holding(target) is not None:
        yield
        return
    if not hasattr(_LOCAL, "held"):
        _LOCAL.held = {}
    held = _LOCAL.held[id(target)] = []
    try:
        yield
    finally:
        del _LOCAL.held[id(target)]
    if held:
        target.send_held(held)


class HeldJournalStorage(JournalStorage):
    """Optuna's JournalStorage whose held writes (``held_writes``) go to the log in one append."""

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution) -> None:
        held = holding(self)
        if held is None:
            return super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        held.append((JournalStorage.set_trial_param, (trial_id, param_name, param_value_internal, distribution)))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        held = holding(self)
        if held is None:
            return super().set_trial_user_attr(trial_id, key, value)
        held.append((JournalStorage.set_trial_user_attr, (trial_id, key, value)))

    def send_held(self, held: list) -> None:
        """Replay the held calls with their log entries collected instead of written, then append them all."""
        _LOCAL.logs = logs = []
        try:
            for method, args in held:
                method(self, *args)
        finally:
            del _LOCAL.logs
        with self._thread_lock:
            self._backend.append_logs(logs)
            self._sync_with_backend()

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        logs = getattr(_LOCAL, "logs", None)
        if logs is None:
            return super()._write_log(op_code, extra_fields)
        logs.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})

    def _sync_with_backend(self) -> None:
        if getattr(_LOCAL, "logs", None) is None:  # while collecting, the log has nothing new of ours yet
            super()._sync_with_backend()

"""Orbax checkpoints of a training state, with resume. A save is atomic (orbax writes to a temporary
directory and renames it when complete), so a kill mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be resumed from."""


class Checkpointer:
    """Saves `state` every `every` steps under `directory`, keeping the newest `keep`.

    `fingerprint` (any JSON-able dict, e.g. the run's config) is stored beside the checkpoints; resuming
    with a different fingerprint is an error rather than a silent mix of two runs. `defaults` (the
    same nesting) are values a key takes when one side lacks it: a config field added after a run
    started does not block resuming that run while the resume leaves it at its default.
    """

    def __init__(self, directory: str | pathlib.Path, every: int, keep: int = 2,
                 fingerprint: dict | None = None, defaults: dict | None = None):
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint(fingerprint, defaults or {})
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True),
        )

    def _check_fingerprint(self, fingerprint: dict | None, defaults: dict) -> None:
        if fingerprint is None:
            return
        path = self.directory / "run.json"
        text = json.dumps(fingerprint, sort_keys=True, indent=1)
        if path.exists():
            stored, new, default = _flat(json.loads(path.read_text())), _flat(json.loads(text)), _flat(defaults)
            missing = object()
            if any(stored.get(k, default.get(k, missing)) != new.get(k, default.get(k, missing))
                   for k in stored.keys() | new.keys()):
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of a run with a different config; "
                    f"use a new output directory or delete it to start over (see {path})")
        else:
            path.write_text(text)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_state: Any) -> tuple[int, Any] | None:
        """The newest checkpoint as (step, state), or None when there is none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for unreadable or mismatched data
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}") from e
        return step, state

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a/b": 1}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out

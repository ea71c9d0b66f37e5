"""The drafter plug-in: what `decode` needs from a drafter, and how to load one by name.

A drafter is a *method* (static config plus three pure functions over its own state pytree) and
the method's *params*. `decode` passes the method to `jax.jit` as a static argument (so it must be
a frozen, hashable dataclass) and the params as an ordinary argument; it knows nothing else about
the drafter. One decode step is:

    tree, state, forwards = method.draft(params, state, root_B, lengths_B)
    ... the target verifies the tree; `verify.accept` picks a path ...
    state = method.commit(params, state, tree, acceptance, features_BxN1xF, lengths_B)

Shapes are static: the tree always has `budget + 1` nodes and depth at most `max_depth`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Protocol

import jax

from specblock_jax import drafter_io
from specblock_jax.ngram import NgramMethod
from specblock_jax.tree import Tree
from specblock_jax.verify import Acceptance

KINDS = ("ngram", "eagle3", "specblock")
_ASSETS = pathlib.Path(__file__).parent / "assets"
SHIPPED_DRAFTERS_DIR = _ASSETS / "drafters"  # <kind>/ per trained kind, for the embedded default target
TOY_DRAFTERS_DIR = _ASSETS / "toy" / "drafters"  # <kind>/ per trained kind, for the 5M toy target


class DraftMethod(Protocol):
    """A drafting method. The batch is static: a row that has stopped keeps being drafted for, and its
    state keeps changing, but `decode` reads nothing of it again."""

    budget: int  # N: draft nodes per tree, besides the root
    max_depth: int  # D: deepest node; the accepted path is [B, D + 1]
    feature_layers: tuple[int, ...]  # target layers whose outputs the drafter consumes; () for none
    # True (the default when absent): a step may draft nothing, and then runs the target's single-token
    # forward instead of the tree's, a second target in the loop body. False: every step verifies its tree.
    can_draft_nothing: bool

    def init(self, params: Any, prompt_BxT: jax.Array, prompt_lens_B: jax.Array,
             features_BxTxF: jax.Array | None, root_B: jax.Array, max_len: int) -> Any:
        """State after the target's prefill of the right-padded prompts. `features_BxTxF` are the
        target's `feature_layers` outputs at every prompt position (None when `feature_layers` is
        empty); `root_B` is the first sampled token, not yet in the target cache; `max_len` is the
        target cache length (prompt + generated tokens never exceed it)."""

    def draft(self, params: Any, state: Any, root_B: jax.Array,
              lengths_B: jax.Array) -> tuple[Tree, Any, jax.Array]:
        """A tree rooted at `root_B` (node 0), the new state, and the number of drafter forward passes
        used (int32 scalar). `lengths_B` are the target's committed lengths: the root sits at position
        lengths_B. Rows with nothing to propose leave every non-root node invalid."""

    def commit(self, params: Any, state: Any, tree: Tree, acceptance: Acceptance,
               features_BxN1xF: jax.Array | None, lengths_B: jax.Array) -> Any:
        """Fold the verified step into the state. `lengths_B` are the target's committed lengths before
        this step: the root and the accepted drafts (`acceptance.path_BxD1[:, :length + 1]`) now sit at
        positions lengths .. lengths + length, and `acceptance.bonus_B` is the next root.
        `features_BxN1xF` are the target's `feature_layers` outputs at every tree node."""


@dataclasses.dataclass(frozen=True)
class Drafter:
    method: Any  # a DraftMethod: frozen and hashable, a static argument of the jitted loop
    params: Any = None  # its parameter pytree (None for training-free drafters)


def shipped_drafters_dir(target_path: str | os.PathLike | None) -> pathlib.Path | None:
    """Where the drafters trained for the target loaded from `target_path` (a `Target.path`) ship: the
    embedded default's (its conversion recognised by the GGUF's content hash) or the toy target's; None
    for any other target, which no shipped drafter serves."""
    from specblock_jax import gguf, hf  # deferred: both import the model code

    if target_path is None:
        return None
    path = pathlib.Path(target_path).resolve()
    if path == hf.TOY_TARGET_DIR.resolve():
        return TOY_DRAFTERS_DIR
    record = path / gguf.CONVERSION_JSON
    if record.is_file() and json.loads(record.read_text()).get("sha256") == gguf.DEFAULT_SHA256:
        return SHIPPED_DRAFTERS_DIR
    return None


def load_drafter(kind_or_path: str, target: Any) -> Drafter:
    """A drafter for `target`, for `generate(..., drafter=)`.

    Args:
        kind_or_path: "ngram" (prompt lookup, no training); "eagle3" or "specblock" (the drafter
            shipped for this target: `shipped_drafters_dir`); or a drafter directory: one written by
            `train.train_drafter`, or a published EAGLE-3 or SpecBlock checkpoint
            (`specblock_jax.eagle3_hf`, `specblock_jax.specblock_hf`).
        target: the `Target` the drafter will serve; a directory's drafter is checked against it.

    Returns:
        A `Drafter` (its method, with the default tree, and its parameters).

    Raises:
        FileNotFoundError: no drafter of that kind ships for this target, or the directory holds no
            drafter.
        ValueError: an unknown kind, or a drafter directory that is malformed or does not fit the
            target (`config.ConfigError`, naming both values).
    """
    if isinstance(kind_or_path, (str, os.PathLike)) and os.path.isdir(kind_or_path):
        method, params = drafter_io.load(kind_or_path, target)
        return Drafter(method, params)
    if kind_or_path == "ngram":
        return Drafter(NgramMethod())
    if kind_or_path in KINDS:
        shipped_dir = shipped_drafters_dir(target.path)
        if shipped_dir is None:
            raise FileNotFoundError(f"no {kind_or_path} drafter ships for the target at {target.path} (drafters ship "
                                    "only for the embedded default target): train one with `python -m "
                                    "train.train_drafter` and pass its directory")
        shipped = shipped_dir / kind_or_path
        if not shipped.is_dir():
            raise FileNotFoundError(f"no {kind_or_path} drafter is shipped at {shipped}: train one with "
                                    "`python -m train.train_drafter` and pass its directory")
        method, params = drafter_io.load(shipped, target)
        return Drafter(method, params)
    raise ValueError(f"unknown drafter {kind_or_path!r}: give one of {', '.join(map(repr, KINDS))} "
                     "or a trained drafter directory")

"""An offline, deterministic tiny MoE checkpoint + tokenizer + trained per-expert LoRA adapter, per family.

Tests and the demo chat need a real model folder and a real KT-style adapter without any hub access:
`build_tiny(root, family=...)` makes both in seconds on a CPU and caches them under `root` (stamped with
a hash of the recipe sources, built in a temp folder and moved into place, so a killed build leaves
nothing that looks complete). DeepSeek-V2 is the default (and the demo); `FAMILY_NAMES` lists the rest.
Importing this package does not import torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .families import FAMILIES, Family, family as family_recipe
from .recipe import SEED, TRAINED_QA

__all__ = ["build_tiny", "FAMILY_NAMES", "TinyPaths", "TRAINED_QA"]

FAMILY_NAMES = tuple(FAMILIES)

logger = logging.getLogger(__name__)

STAMP = "tiny-stamp.json"
_PARTS = ("model", "adapter")


@dataclass(frozen=True)
class TinyPaths:
    """Where a tiny build lives: `model` (HF model folder with tokenizer), `adapter` (PEFT folder)."""

    root: Path
    model: Path
    adapter: Path


def _recipe_hash(recipe: Family) -> str:
    """sha256 over the family's recipe version and this package's sources: any edit invalidates caches."""
    h = hashlib.sha256(recipe.version.encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()


def _listing(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for part in _PARTS for p in sorted((root / part).rglob("*")) if p.is_file()}


def _is_complete(root: Path, recipe_hash: str) -> bool:
    try:
        stamp = json.loads((root / STAMP).read_text())
        return stamp["recipe_sha256"] == recipe_hash and stamp["files"] == _listing(root)
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _deterministic():
    """Seeded, single-threaded, deterministic torch for the build; restores the caller's settings."""
    import torch

    threads = torch.get_num_threads()
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.set_num_threads(threads)


def _build_into(tmp: Path, final_root: Path, recipe: Family) -> None:
    """Writes `model` and `adapter` of the family's recipe into `tmp`; the adapter names `final_root`'s model."""
    from . import checkpoint, train

    t0 = time.monotonic()
    with _deterministic():
        checkpoint.write_model_dir(tmp / "model", recipe)
        logger.info("tiny %s model written in %.1fs", recipe.name, time.monotonic() - t0)
        train.train_adapter(tmp / "model", tmp / "adapter", str(final_root / "model"), recipe)
    logger.info("tiny build done in %.1fs", time.monotonic() - t0)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def build_tiny(root: str | os.PathLike, *, family: str = "deepseek_v2", force: bool = False) -> TinyPaths:
    """Builds (or reuses) the tiny model + adapter of `family` (a model_type) under `root`; returns their paths.

    Idempotent: a complete build with a matching stamp is returned at once unless `force`.
    Concurrent callers on the same root are serialised by a lock file.
    """
    root = Path(root).resolve()
    paths = TinyPaths(root=root, model=root / "model", adapter=root / "adapter")
    recipe = family_recipe(family)  # an unknown family fails here, before anything is written
    recipe_hash = _recipe_hash(recipe)
    if not force and _is_complete(root, recipe_hash):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_complete(root, recipe_hash):
            return paths
        for stale in root.glob(".build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("building tiny %s + LoRA adapter in %s", family, root)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build_into(tmp, root, recipe)
            (root / STAMP).unlink(missing_ok=True)  # from here on the old build is not complete
            for derived in root.glob("merged-*"):  # hand-merged references (tests/reference.py) of the old build
                shutil.rmtree(derived, ignore_errors=True)
            for part in _PARTS:
                if (root / part).exists():
                    shutil.rmtree(root / part)
                os.replace(tmp / part, root / part)
            stamp = {"recipe": recipe.version, "recipe_sha256": recipe_hash, "built_with": _versions(),
                     "files": _listing(root)}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            os.replace(tmp / STAMP, root / STAMP)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths

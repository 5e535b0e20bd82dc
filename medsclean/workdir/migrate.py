"""Work folders of earlier layouts brought to today's, when a `Store` opens one.

Two migrations, in this order, each a no-op on a folder that does not need it:

1. `adopt_flat_layout`: 0.1.0 kept one artifact per stage folder (`<work>/<stage>/manifest.json`);
   it moves to `<work>/<stage>/<key>/`.
2. `rename_stages`: up to 0.1.x the stages `extract` and `score` were stored as `features/`,
   `scores/` and `features-test/`; those folders become `extract/`, `score/` and `extract-test/`
   (`STAGE_RENAMES`), with the stage names inside the artifacts' manifests and the run records.

Every artifact keeps its key (the keys are digests of the inputs, which never named a folder), so
nothing is recomputed. `rename_stages` is safe to run twice and to interrupt: the old folders go
last, and while one is left a later open finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from medsclean.workdir.artifacts import LATEST, MANIFEST, read_manifest
from medsclean.workdir.atomic import to_json, write_json_atomic, write_text_atomic

STAGE_RENAMES = {"features": "extract", "scores": "score", "features-test": "extract-test"}
"""Stage folder names of 0.1.x -> today's (the names of the `extract` and `score` commands)."""


def migrate_work_folder(work: Path) -> None:
    """Bring `work` to today's layout: the 0.1.0 one first, then the stage names."""
    adopt_flat_layout(work)
    if any((work / old).is_dir() for old in STAGE_RENAMES):
        with _exclusive(work / ".locks" / "migrate.lock"):
            rename_stages(work)


def adopt_flat_layout(work: Path) -> None:
    """Move 0.1.0 artifacts (`<work>/<stage>/manifest.json`) to `<work>/<stage>/<key>/`."""
    for manifest_path in work.glob(f"*/{MANIFEST}"):
        manifest = read_manifest(manifest_path)
        stage_dir = manifest_path.parent
        if manifest is None or manifest.get("stage") != stage_dir.name:
            continue
        aside = work / f".adopt-{stage_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(stage_dir, aside)
        stage_dir.mkdir()
        os.replace(aside, stage_dir / str(manifest["key"]))
        write_text_atomic(stage_dir / LATEST, f"{manifest['key']}\n")


def rename_stages(work: Path) -> None:
    """Rename the stage folders of `STAGE_RENAMES` and the stage names that refer to them.

    First the manifests (their "stage" and the stage names of their "parents") and the run records'
    artifact maps are rewritten, then the stale locks of the old names dropped, then each old folder
    renamed (or, when the new one exists too, its keys that the new one lacks moved into it; a key
    in both keeps the new copy) and removed. Callers hold the migration lock (`migrate_work_folder`).
    """
    olds = [old for old in STAGE_RENAMES if (work / old).is_dir()]
    if not olds:
        return
    for manifest_path in work.glob(f"*/*/{MANIFEST}"):
        _rename_in_manifest(manifest_path)
    for record_path in sorted((work / "runs").glob("*.json")):
        _rename_in_run_record(record_path)
    _drop_stale_locks(work)
    for old in olds:
        _move_stage_folder(work / old, work / STAGE_RENAMES[old])


def renamed(names: dict) -> dict:
    """`names` (stage -> anything) with the old stage names replaced, in the same order."""
    return {STAGE_RENAMES.get(name, name): value for name, value in names.items()}


def _rename_in_manifest(path: Path) -> None:
    manifest = read_manifest(path)
    if manifest is None:
        return
    updated = {**manifest, "stage": STAGE_RENAMES.get(manifest.get("stage"), manifest.get("stage"))}
    if isinstance(manifest.get("parents"), dict):
        updated["parents"] = renamed(manifest["parents"])
    if updated != manifest:
        folder_times = path.parent.stat()  # `Store.keys` orders a stage's artifacts by folder mtime
        write_json_atomic(path, updated)
        os.utime(path.parent, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))


def _rename_in_run_record(path: Path) -> None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    runs = record.get("runs") if isinstance(record, dict) else None
    if not isinstance(runs, dict):
        return
    changed = False
    for run in runs.values():
        if isinstance(run, dict) and isinstance(run.get("artifacts"), dict):
            artifacts = renamed(run["artifacts"])
            changed |= list(artifacts) != list(run["artifacts"])
            run["artifacts"] = artifacts
    if changed:
        write_text_atomic(path, to_json(record) + "\n")


def _drop_stale_locks(work: Path) -> None:
    """Delete the `.locks/<old stage>-<key>.lock|.use` files that no process holds (a held one stays:
    the lock is the open file, its name only says what it guards)."""
    import fcntl

    for path in sorted((work / ".locks").glob("*-*.*")):
        if path.name.rsplit("-", 1)[0] not in STAGE_RENAMES:
            continue
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)


def _move_stage_folder(old: Path, new: Path) -> None:
    if not new.exists():
        os.replace(old, new)
        return
    for entry in sorted(old.iterdir()):
        if entry.is_dir() and not (new / entry.name).exists():
            os.replace(entry, new / entry.name)
    if (old / LATEST).is_file() and not (new / LATEST).is_file():
        os.replace(old / LATEST, new / LATEST)
    shutil.rmtree(old)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield

"""Runs: the `select` results kept side by side in one work folder, and a pointer per dataset.

A run is one clean list (a `cut` artifact) with the chain of artifacts it came from (extract,
score, distill, select). `WORK/runs/<dataset>.json` records, for one image folder, every run made
from it with the options that made it, and which run is the latest; it is plain JSON for people
and scripts. Removing a run deletes its artifacts unless another remaining run uses them.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from medsclean.config import CutConfig
from medsclean.errors import ConfigError
from medsclean.workdir.artifacts import folder_bytes
from medsclean.workdir.atomic import to_json, write_text_atomic
from medsclean.workdir.store import Store

POINTER_SCHEMA = "medsclean.run-record/1"


def dataset_id(root: Path) -> str:
    """A readable, stable file name for an image folder: its name and a hash of its absolute path."""
    root = Path(root).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-") or "root"
    return f"{name}-{hashlib.sha256(str(root).encode('utf-8')).hexdigest()[:8]}"


def _pointer(store: Store, root: Path) -> Path:
    return store.work / "runs" / f"{dataset_id(root)}.json"


def _read(path: Path) -> dict | None:
    import json

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema") == POINTER_SCHEMA else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def record_run(store: Store, root: Path, chain: dict[str, str | None], configs: dict[str, Any], *,
               preset: str, seed: int) -> dict:
    """Add (or refresh) the run whose artifacts are `chain` (stage -> key) to the dataset's record and
    make it the latest. `configs` maps a stage name to its config dataclass, or to the plain dict a
    record holds (stored as plain JSON)."""
    path = _pointer(store, root)
    with store.locked(path.stem):
        return _add_run(store, path, root, chain, configs, preset=preset, seed=seed)


def _add_run(store: Store, path: Path, root: Path, chain: dict[str, str | None], configs: dict[str, Any], *,
             preset: str, seed: int) -> dict:
    record = _read(path) or {"schema": POINTER_SCHEMA, "images": str(Path(root).resolve()), "runs": {}}
    key = chain["cut"]
    record["runs"][key] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": preset, "seed": seed,
                           "artifacts": dict(chain),
                           "options": {name: _plain(asdict(cfg) if is_dataclass(cfg) else cfg)
                                       for name, cfg in configs.items()}}
    record["latest"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_json(record) + "\n")
    return record


def _records(store: Store) -> list[tuple[Path, dict]]:
    folder = store.work / "runs"
    found = [(p, _read(p)) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [(p, r) for p, r in found if r is not None]


def latest_run(store: Store, root: Path) -> tuple[str, dict | None] | None:
    """(key, run) of the dataset's latest run; run is None when some of its artifacts were removed;
    None when the dataset has no run."""
    record = _read(_pointer(store, root))
    if record is None or record.get("latest") not in record["runs"]:
        return None
    key = record["latest"]
    return (key, record["runs"][key]) if _complete(store, record["runs"][key]) else (key, None)


def folder_runs(store: Store, root: Path) -> dict[str, dict]:
    """{key: run} of every run of the image folder `root` whose artifacts are all in the work folder."""
    record = _read(_pointer(store, root))
    return {k: run for k, run in (record or {}).get("runs", {}).items() if _complete(store, run)}


def find_run(store: Store, key_prefix: str, *, stage: str = "eval") -> tuple[str, dict, str]:
    """(key, run, images root) of the run whose key starts with `key_prefix`, in any dataset.

    Raises:
        ConfigError(param "run"): no run, or several, match.
    """
    matches = [(key, run, record["images"]) for _, record in _records(store)
               for key, run in record["runs"].items() if key.startswith(key_prefix)]
    if not matches:
        raise ConfigError("run", f"run {key_prefix} is not in {store.work}; `medsclean runs` lists the runs",
                          stage=stage)
    if len({m[0] for m in matches}) > 1:
        raise ConfigError("run", f"run {key_prefix} is ambiguous ({', '.join(m[0] for m in matches)}); "
                          f"give more characters", stage=stage)
    key, run, images = matches[0]
    if stage == "eval" and not _complete(store, run):
        raise ConfigError("run", f"run {key}: some of its artifacts were removed from {store.work}; "
                          f"rerun `medsclean select` to make it again", stage=stage)
    return key, run, images


def _complete(store: Store, run: dict) -> bool:
    return all(store.load(stage, key) is not None for stage, key in run["artifacts"].items() if key)


def list_runs(store: Store) -> list[dict]:
    """One row per run: dataset, key, method, cut, the kept and rejected counts of its clean list
    (None when its cut artifact is gone), options, date, bytes of its artifacts (an artifact shared
    by several runs counts in each), and whether it is its dataset's latest."""
    rows = []
    for _, record in _records(store):
        for key, run in record["runs"].items():
            artifacts = {s: k for s, k in run["artifacts"].items() if k}
            size = sum(folder_bytes(store.stage_path(s, k)) for s, k in artifacts.items())
            options = run["options"]
            cut = store.load("cut", key)
            rows.append({"run": key, "images": record["images"], "created": run["created"],
                         "method": options.get("select", {}).get("method"), "cut": _cut_text(options.get("cut", {})),
                         "kept": cut.manifest.get("kept") if cut else None,
                         "rejected": cut.manifest.get("rejected") if cut else None,
                         "preset": run["preset"], "seed": run["seed"], "bytes": size,
                         "latest": record.get("latest") == key, "complete": _complete(store, run),
                         "artifacts": artifacts})
    return sorted(rows, key=lambda r: (r["images"], r["created"]))


def _cut_text(cut: dict) -> str | None:
    """The recorded cut as `CutConfig.describe` words it; None for a run recorded without one."""
    if not cut:
        return None
    known = {f.name for f in fields(CutConfig)}
    return CutConfig(**{k: v for k, v in cut.items() if k in known}).describe()


def remove_runs(store: Store, keys: list[str], *, prefix: bool = False) -> dict:
    """Delete runs and every artifact no remaining run uses; returns {"removed": [...], "bytes": freed}.

    Each of `keys` is a run's full key, or with `prefix` the start of one; a prefix without `prefix`
    is refused before anything is removed.

    The artifacts to delete and every image cache are first claimed (`Store.claimed`): when a running
    command reads or writes one of them (a `select` on the same features, an extraction filling the
    image cache), nothing is removed and the run records are left as they were.

    Raises:
        ConfigError(param "run"): a key names no run, or several, or is a prefix without `prefix`.
        InUseError: a running command uses one of them.
    """
    from medsclean.stages.features import prune_image_cache
    from medsclean.workdir.image_cache import IMAGE_CACHE

    doomed = {_full_key(store, k, prefix) for k in keys}
    keep_refs: set[tuple[str, str]] = set()
    doomed_refs: set[tuple[str, str]] = set()
    for _, record in _records(store):
        for key, run in record["runs"].items():
            refs = {(s, k) for s, k in run["artifacts"].items() if k}
            (doomed_refs if key in doomed else keep_refs).update(refs)
    deleted = sorted(doomed_refs - keep_refs)
    caches = [cache.key for cache in store.image_caches()]
    with store.claimed([*deleted, *((IMAGE_CACHE, key) for key in caches)]):
        for path, _ in _records(store):
            with store.locked(path.stem):
                _drop_runs(path, doomed)
        freed = sum(store.remove(stage, key) for stage, key in deleted)
        files, cache_bytes = prune_image_cache(store, caches)
    return {"removed": sorted(doomed), "bytes": freed + cache_bytes, "image_cache_files": files}


def _full_key(store: Store, key: str, prefix: bool) -> str:
    """The run `key` names: itself, or with `prefix` the one run whose key starts with it."""
    full = find_run(store, key, stage="runs")[0]
    if full != key and not prefix:
        raise ConfigError("run", f"run {key} is only a prefix of {full}; pass the full key, or --yes to remove by "
                          f"prefix", stage="runs")
    return full


def _drop_runs(path: Path, doomed: set[str]) -> None:
    """Take the runs `doomed` out of the run record at `path` (deleted when none is left)."""
    record = _read(path)
    if record is None:
        return
    record["runs"] = {k: v for k, v in record["runs"].items() if k not in doomed}
    if record.get("latest") in doomed:
        remaining = sorted(record["runs"].items(), key=lambda kv: kv[1]["created"])
        record["latest"] = remaining[-1][0] if remaining else None
    if record["runs"]:
        write_text_atomic(path, to_json(record) + "\n")
    else:
        path.unlink()

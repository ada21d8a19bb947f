"""The run directory: checkpoints (atomic, checksummed, free of pickle), their pruning and
recovery, and the append-only metrics log.

A checkpoint directory holds a Hugging Face model directory (``model.safetensors``, config,
tokenizer), the trainer state as ``trainer_state.json`` + ``trainer_state.safetensors`` (its
tensors), and ``manifest.json`` with the size and SHA-256 of every file. Nothing in it is
unpickled or executed on resume: a file that does not match the manifest, or a state that does
not decode, makes the checkpoint unusable and resume falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("nftune")

MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the directory, file and problem."""


# ---------------------------------------------------------------------------------------------
# Trainer state: JSON for the structure, safetensors for the tensors
# ---------------------------------------------------------------------------------------------


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of nested dicts/lists/tuples of numbers, strings and tensors; each tensor
    becomes ``{"__tensor__": name}`` and goes to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{name}: cannot store dict keys of type "
                            f"{sorted({type(k).__name__ for k in value})}")
        return {"__items__": [[k, _encode(v, f"{name}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name}: cannot store a {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        if value["__tensor__"] not in tensors:
            raise CheckpointError(f"{where}: tensor {value['__tensor__']!r} is missing")
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if set(value) == {"__items__"} and isinstance(value["__items__"], list):
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int))
                   for p in value["__items__"]):
            raise CheckpointError(f"{where}: malformed '__items__'")
        return {k: _decode(v, tensors, where) for k, v in value["__items__"]}
    if any(k.startswith("__") for k in value):
        raise CheckpointError(f"{where}: unknown tag in {sorted(value)}")
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as trainer_state.json + trainer_state.safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "state", tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(encoded), encoding="utf-8")


def load_state(directory: Path) -> dict[str, Any]:
    """The trainer state saved by :func:`save_state`; no pickle, no code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = str(directory / STATE_JSON)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        encoded = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{directory}: cannot read the trainer state ({err})") from None
    state = _decode(encoded, tensors, where)
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected an object")
    return state


# ---------------------------------------------------------------------------------------------
# Saving, checking and finding checkpoints
# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(directory: Path, fill) -> None:
    """``fill(tmp)`` writes a directory's files into a temporary sibling, which is flushed to
    disk and renamed into place: a crash leaves the previous ``directory`` intact."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    _fsync(directory.parent)


def save_checkpoint(directory: Path, model, tokenizer, state: dict[str, Any]) -> None:
    """A step checkpoint, written atomically (:func:`write_atomically`): the policy as
    :func:`nftune.policy.save_policy` stores it, the tokenizer, the trainer state and the
    manifest of every file's size and SHA-256."""
    from nftune.policy import save_policy

    def fill(tmp: Path) -> None:
        save_policy(model, tmp)
        tokenizer.save_pretrained(tmp)
        save_state(tmp, state)
        files = {path.relative_to(tmp).as_posix(): {"bytes": path.stat().st_size,
                                                    "sha256": sha256_file(path)}
                 for path in sorted(p for p in tmp.rglob("*") if p.is_file())}
        (tmp / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files},
                                               indent=1))

    write_atomically(directory, fill)


def check_checkpoint(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless every file the manifest lists is there with its
    size and SHA-256 (a torn write, a truncated or bit-flipped file, a replaced file)."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST} (not written by this nftune, or "
                              "cut off while saving)")
    try:
        listed = json.loads(manifest.read_text())
    except ValueError:
        listed = None
    files = listed.get("files") if isinstance(listed, dict) else None
    if listed is None or listed.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) \
            or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointError(f"{manifest}: not a valid manifest")
    for name in ("model.safetensors", STATE_JSON, STATE_TENSORS):
        if name not in files and not (name == "model.safetensors" and any(
                (f.startswith("model-") and f.endswith(".safetensors"))
                or f == "adapter_model.safetensors" for f in files)):  # sharded, or LoRA
            raise CheckpointError(f"{manifest}: does not list {name}")
    for name, expected in files.items():
        path = directory / name
        if ".." in Path(name).parts or not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, the manifest says "
                                  f"{expected.get('bytes')} (truncated or replaced)")
        if sha256_file(path) != expected.get("sha256"):
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest (corrupted)")


def step_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoints/step-N, oldest first (unchecked)."""
    return sorted((int(p.name.split("-", 1)[1]), p)
                  for p in (output_dir / "checkpoints").glob("step-*")
                  if p.is_dir() and p.name.split("-", 1)[1].isdigit())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that passes :func:`check_checkpoint`; each damaged newer one is
    reported (logged as a warning) and skipped. None if there is no checkpoint at all;
    :class:`CheckpointError` if there are some and none is intact."""
    found = step_checkpoints(output_dir)
    problems = []
    for _, path in reversed(found):
        try:
            check_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("checkpoint %s is unusable: %s; trying the one before", path.name, err)
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    if problems:
        raise CheckpointError(f"{output_dir}: no intact checkpoint to resume from: "
                              + "; ".join(problems))
    return None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` (at least 1) step checkpoints."""
    found = step_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(path)


def remove_stale(output_dir: Path) -> None:
    """Clear what a crash mid-save leaves: ``.tmp-*`` directories are dropped; an ``.old-*``
    one is dropped if its replacement is in place, else moved back."""
    for parent in (output_dir, output_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in parent.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in parent.glob(".old-*"):
            name = path.name[len(".old-"):].rsplit("-", 1)[0]
            target = parent / name
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(target)


# ---------------------------------------------------------------------------------------------
# What a run was started on: the content of its local input paths, so that it can move
# ---------------------------------------------------------------------------------------------

# config keys that name local files or directories (besides names, modules and hub ids)
INPUT_KEYS = ("model", "train_data", "plugins", "reward")
WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20  # of a larger one: its size and 17 windows of this size


def content_digest(path: Path) -> str:
    """SHA-256 of a file, whole up to 64 MiB; of a larger one (weights) its size, its first
    MiB (a safetensors header names every tensor) and 16 more evenly spaced 1 MiB windows
    (timings in docs/training.md); a fine-tune changes every window."""
    size = path.stat().st_size
    if size <= WHOLE_FILE_BYTES:
        return sha256_file(path)
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for i in range(17):
            f.seek((size - SAMPLE_BYTES) * i // 16)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _model_files(directory: Path) -> list[Path]:
    """The files of a model directory that make the model: not its card, licence or dotfiles."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix != ".md" and not p.name.upper().startswith("LICENSE"))


def input_paths(key: str, value: str) -> list[str]:
    """The local paths a config value names (none for a hub id, a set name or a module)."""
    if key in ("model", "train_data"):
        return [value] if value and Path(value).expanduser().exists() else []
    if key == "plugins":
        return [n.strip() for n in value.split(",") if n.strip().endswith(".py")]
    if key == "reward":
        from nftune.reward import parse_reward_spec

        return [t.target.rpartition(":")[0] for t in parse_reward_spec(value)
                if t.target.rpartition(":")[0].endswith(".py")]
    raise KeyError(key)


def input_fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """For each key of :data:`INPUT_KEYS` that names local paths, one digest of what they hold
    (names within a directory, and contents): the same files elsewhere give the same."""
    found = {}
    for key in INPUT_KEYS:
        paths = input_paths(key, str(config.get(key) or ""))
        if not paths:
            continue
        digest = hashlib.sha256()
        for name in paths:
            path = Path(name).expanduser()
            files = _model_files(path) if path.is_dir() else [path]
            for file in files:
                digest.update(f"{file.name if path.is_dir() else ''}\0"
                              f"{content_digest(file)}\n".encode())
            digest.update(b"\1")
        found[key] = digest.hexdigest()
    return found


def moved_inputs(saved: dict[str, Any] | None, now: dict[str, str], saved_config: dict[str, Any],
                 config: dict[str, Any]) -> list[str]:
    """The input keys whose paths changed since the run started but hold the same files (free
    to differ on resume). Where the files differ, at a new path or the same one, ValueError
    naming the key and both paths; a checkpoint without fingerprints (``saved`` None, an
    older nftune) moves nothing."""
    if not isinstance(saved, dict):
        return []
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        show = "; ".join(f"{k}: {saved_config.get(k)!r} then, {config.get(k)!r} now"
                         for k in differ)
        raise ValueError(f"--resume: not the files the run started with ({show}); point "
                         f"{', '.join(differ)} at a copy of the original, or start a new run")
    return [k for k in now if k in saved and saved_config.get(k) != config.get(k)]


class MetricsLog:
    """metrics.jsonl, one line per step, and completions.jsonl, one line per logged answer,
    beside it: appended and flushed; optional TensorBoard / W&B.

    The W&B run is named ``run_name`` in ``project`` (default ``$WANDB_PROJECT``, else
    nftune); its id is kept in ``wandb-run-id`` beside the metrics so that a resumed run
    (``resumed_at``: the checkpoint's step) continues the same W&B run. TensorBoard drops the
    events of steps after that checkpoint (they are redone)."""

    def __init__(self, path: Path, report_to: str, config: dict[str, Any],
                 run_name: str | None = None, resumed_at: int | None = None,
                 project: str | None = None):
        self.file = path.open("a", encoding="utf-8")
        self.completions_path = path.parent / "completions.jsonl"
        self.backend: Any = None
        self.kind = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(
                str(path.parent / "tensorboard"),
                purge_step=resumed_at + 1 if resumed_at is not None else None)
        elif report_to == "wandb":
            import wandb

            id_file = path.parent / "wandb-run-id"
            run_id = id_file.read_text().strip() if resumed_at is not None and \
                id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            project = project or os.environ.get("WANDB_PROJECT") or "nftune"
            self.backend = wandb.init(project=project, name=run_name, id=run_id,
                                      resume="allow", dir=str(path.parent), config=config,
                                      mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.kind == "tensorboard":
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.backend.add_scalar(key, value, row["step"])
        elif self.kind == "wandb":
            self.backend.log(row, step=row["step"])

    def write_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A step's sampled answers (one dict each, the same keys): appended to
        completions.jsonl, and as a table to W&B or a Markdown table to TensorBoard."""
        if not rows:
            return
        with self.completions_path.open("a", encoding="utf-8") as file:
            file.write("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
            file.flush()
            os.fsync(file.fileno())
        columns = list(rows[0])
        if self.kind == "tensorboard":
            def cell(value: Any) -> str:
                return str(value).replace("|", "\\|").replace("\n", "<br>")

            table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
            table += [f"| {' | '.join(cell(r[c]) for c in columns)} |" for r in rows]
            self.backend.add_text("completions", "\n".join(table), step)
        elif self.kind == "wandb":
            import wandb

            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.backend.log({"completions": table}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.backend is not None:
            self.backend.close() if self.kind == "tensorboard" else self.backend.finish()


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone). A torn
    last line (a crash mid-write) is dropped with a warning; a bad line before it is an error."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):
                log.warning("%s: dropped a torn last line (%d characters)", path, len(line))
                break
            raise ValueError(f"{path}: line {n} is not JSON; fix or remove it") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n} is not a JSON object")
        if row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)

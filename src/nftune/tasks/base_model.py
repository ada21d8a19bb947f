"""The demo's base model: a tiny Qwen2 taught the arithmetic task by a short supervised warm-up
on noisy worked solutions, saved as a normal HF model directory.

The default base ships inside the package (``demo_base/``, 1.7 MB) with the SHA-256 of each
file, checked at load: the warm-up amplifies floating-point rounding, so two machines building
"the same" base get different models (measured with the former 800-step warm-up: greedy
accuracy 16–48% for one spec; the 2,400 steps of today's default bring every seed tried to
85–96% greedy). Other specs, and ``--rebuild``, are built here and cached under a key of the
spec and of the code that builds them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nftune.data import format_prompt
from nftune.tasks.tiny_model import char_tokenizer, save_model_dir, tiny_qwen2

TEMPLATE = "raw"  # the prompt is the expression itself; the solution starts on the next line
SHIPPED_DIR = Path(__file__).with_name("demo_base")
# base models shipped in the package, one per task (benchmarks/ship_demo_base.py writes them)
SHIPPED_BASES = {"arithmetic": SHIPPED_DIR,
                 "countdown": Path(__file__).with_name("countdown_base")}
INFO_FILE = "nftune_base.json"
# the demo's tasks (modules of nftune.tasks with make_problems / make_questions) → their reward
TASKS = {"arithmetic": "math", "countdown": "countdown"}


def task_module(task: str):
    """The module of one of the demo's tasks."""
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; valid: {sorted(TASKS)}")
    return importlib.import_module(f"nftune.tasks.{task}")


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model; its hash names the cache entry."""

    level: int = 2
    seed: int = 0
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    train_problems: int = 4000
    noise: float = 0.3  # probability that a worked step is off by a little
    sft_steps: int = 2400
    batch_size: int = 64
    lr: float = 3e-3
    task: str = "arithmetic"

    def key(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items()).replace(".", "p")


def sft_example(problem_text: str, solution: str) -> tuple[str, str]:
    """(prompt, completion): the completion is what the model learns to write."""
    return format_prompt(problem_text, TEMPLATE), "\n" + solution


def build_base_model(path: str | Path, spec: BaseSpec = BaseSpec(), progress=None) -> Path:
    """Train the base model from scratch and save it to ``path`` (atomically)."""
    path = Path(path)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = char_tokenizer()
    model = tiny_qwen2(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                       kv_heads=max(1, spec.heads // 2), seed=spec.seed)
    problems = task_module(spec.task).make_problems(spec.train_problems, "train", spec.seed,
                                                    spec.level)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr,
                                                   total_steps=spec.sft_steps, pct_start=0.1)
    eos = tokenizer.eos_token_id
    model.train()
    start = time.perf_counter()
    for step in range(spec.sft_steps):
        rows, targets = [], []
        for p in rng.sample(problems, spec.batch_size):
            prompt, completion = sft_example(p.text, p.solution(rng, spec.noise)[0])
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(prompt_ids + completion_ids)
            targets.append([-100] * len(prompt_ids) + completion_ids)  # loss on the answer only
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None])
        loss = model(input_ids=ids, attention_mask=attn.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, spec.sft_steps, loss.item())
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(model, tokenizer, tmp)
    (tmp / INFO_FILE).write_text(json.dumps(
        {"spec": asdict(spec), "sft_seconds": round(time.perf_counter() - start, 1),
         "code": _code_hash(spec.task), "sha256": _file_hashes(tmp)}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _code_hash(task: str = "arithmetic") -> str:
    """Hash of the code that builds a base: a cached base is rebuilt when it changes."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in dict.fromkeys(("base_model.py", "arithmetic.py", f"{task}.py", "tiny_model.py")):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:10]


def _file_hashes(path: Path) -> dict[str, str]:
    from nftune.checkpoint import sha256_file

    return {p.name: sha256_file(p) for p in sorted(path.iterdir())
            if p.is_file() and p.name != INFO_FILE}


def shipped_spec(task: str = "arithmetic") -> BaseSpec | None:
    """The spec of the base shipped for ``task``; None if none is."""
    info = SHIPPED_BASES[task] / INFO_FILE
    return BaseSpec(**json.loads(info.read_text())["spec"]) if info.exists() else None


def check_base_dir(path: Path) -> dict:
    """The base's info (spec, file hashes, measured accuracy); ValueError naming the file if a
    file is missing or differs from its recorded SHA-256."""
    from nftune.checkpoint import sha256_file

    info = json.loads((path / INFO_FILE).read_text())
    for name, expected in info.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file}: missing from the demo base (reinstall, or --rebuild)")
        if sha256_file(file) != expected:
            raise ValueError(f"{file}: SHA-256 differs from {path / INFO_FILE} "
                             "(damaged; reinstall, or --rebuild)")
    return info


def cached_base_model(cache_dir: str | Path, spec: BaseSpec = BaseSpec(), rebuild: bool = False,
                      progress=None) -> tuple[Path, str]:
    """The base model for ``spec``: the shipped one if it has this spec (checked against its
    hashes), else from the cache, building it if missing (or ``rebuild``). Returns (model dir,
    where it came from: "shipped" | "cached" | "built")."""
    shipped = SHIPPED_BASES.get(spec.task)
    if not rebuild and shipped is not None and shipped_spec(spec.task) == spec:
        check_base_dir(shipped)
        return shipped, "shipped"
    path = Path(cache_dir) / f"{spec.key()}-code{_code_hash(spec.task)}"
    if path.exists() and (path / INFO_FILE).exists() and not rebuild:
        check_base_dir(path)
        return path, "cached"
    build_base_model(path, spec, progress)
    return path, "built"

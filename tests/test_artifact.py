"""What a run leaves behind: final/ is a model (the base's dtype, no trainer state, a hub model
card), disk space is stated and checked before every write, a directory holding a run is not
overwritten by accident, and W&B keeps one run across a resume."""

import json
import os

import pytest
import torch
import yaml
from helpers import tiny_run_config

from nftune.config import build_config
from nftune.train import Trainer, train


def run_config(base, files, out, **overrides):
    return tiny_run_config(base, files, out, **{"steps": 2, "seed": 3, **overrides})


@pytest.fixture(scope="module")
def bf16_base(tiny_base, tmp_path_factory):
    """The tiny base saved in bfloat16: its config declares that dtype, as real models do."""
    from transformers import AutoModelForCausalLM

    from nftune.policy import load_tokenizer

    out = tmp_path_factory.mktemp("bf16") / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    model.save_pretrained(out)
    load_tokenizer(str(tiny_base)).save_pretrained(out)
    return out


def safetensors_dtypes(path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_final_is_a_model_in_the_base_dtype_with_a_model_card(bf16_base, arithmetic_files,
                                                              tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = run_config(bf16_base, arithmetic_files, tmp_path / "auto", eval_every=2,
                     eval_data=str(arithmetic_files["test"]), eval_limit=4)
    final = train(cfg, progress=False)
    files = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert not {f for f in files if f.startswith("trainer_state") or f == "manifest.json"}
    assert {"model.safetensors", "config.json", "README.md", "nftune_config.yaml",
            "generation_config.json"} <= files
    assert safetensors_dtypes(final / "model.safetensors") == {"BF16"}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, its own dtype
    assert model.dtype == torch.bfloat16

    # the same run asked for float32 holds the same weights, before the cast
    f32 = train(run_config(bf16_base, arithmetic_files, tmp_path / "f32", eval_every=2,
                           eval_data=str(arithmetic_files["test"]), eval_limit=4,
                           final_dtype="float32"), progress=False)
    assert safetensors_dtypes(f32 / "model.safetensors") == {"F32"}
    a, b = load_file(final / "model.safetensors"), load_file(f32 / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name].to(torch.bfloat16)), name

    # the card: the hub's YAML header, then what was trained and how to reproduce it
    card = (final / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == str(bf16_base)
    assert header["library_name"] == "transformers" and "nft" in header["tags"]
    assert "datasets" not in header  # a local file is not a hub dataset
    rows = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert "| steps | 2 of 2 |" in card
    assert "eps=1.0" in card and "weight=dr_grpo" in card
    eval_key = next(k for k in rows[-1] if k.startswith("eval/"))
    assert f"| {eval_key.removeprefix('eval/')} | {rows[-1][eval_key]:.4g} |" in card
    assert "nftune train --config nftune_config.yaml" in card
    assert build_config(str(final / "nftune_config.yaml")).to_dict() == cfg.to_dict()


def test_card_names_a_known_set_by_its_hub_id(tiny_base):
    from nftune.artifact import model_card

    cfg = build_config(None, {"model": "Qwen/Qwen2.5-Math-1.5B", "train_data": "dapo17k"})
    header = yaml.safe_load(model_card(cfg, [], torch.bfloat16, "run").split("---")[1])
    assert header["datasets"] == ["BytedTsinghua-SIA/DAPO-Math-17k"]
    assert header["base_model"] == "Qwen/Qwen2.5-Math-1.5B"


def test_a_checkpoint_that_does_not_fit_is_refused_and_earlier_ones_stay(
        tiny_base, arithmetic_files, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from nftune import artifact
    from nftune.artifact import DiskSpaceError
    from nftune.checkpoint import check_checkpoint

    out = tmp_path / "run"
    with Trainer(run_config(tiny_base, arithmetic_files, out, steps=3, save_every=1)) as trainer:
        assert "one checkpoint" in trainer.disk_plan and "final/" in trainer.disk_plan
        trainer.step()
        first = out / "checkpoints" / "step-1"
        check_checkpoint(first)
        # the checkpoint's size, written down from the files of the one just written
        written = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
        assert 0.9 * written <= trainer.checkpoint_size <= 1.1 * written
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(artifact.shutil, "disk_usage",
                            lambda path: usage(10**12, 10**12, trainer.checkpoint_size // 2))
        with pytest.raises(DiskSpaceError) as err:
            trainer.step()
    message = str(err.value)
    assert str(out / "checkpoints" / "step-2") in message
    assert f"({trainer.checkpoint_size} bytes)" in message
    check_checkpoint(first)  # untouched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert shutil.disk_usage  # the real one, for the rest of the session (monkeypatch undoes)


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tiny_base, arithmetic_files,
                                                             tmp_path):
    from helpers import run_cli

    out = tmp_path / "run"
    args = ["train", "--model", tiny_base, "--train-data", arithmetic_files["train"],
            "--output-dir", out, "--steps", "1", "--no-progress", "--template", "raw",
            "--prompts-per-step", "4", "--answers-per-prompt", "4", "--max-new-tokens", "16",
            "--verify-workers", "1", "--save-every", "0"]
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode == 2
    assert str(out) in again.stderr and "--resume" in again.stderr
    assert "--overwrite" in again.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # not appended to
    fresh = run_cli(*args, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's only


def test_wandb_run_is_named_and_resume_continues_it(tiny_base, arithmetic_files, tmp_path,
                                                    monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "my-run"
    cfg = run_config(tiny_base, arithmetic_files, out, steps=2, save_every=1, report_to="wandb")
    with Trainer(cfg) as trainer:
        trainer.step()
        first = trainer.metrics_log.backend
        assert first.name == "my-run"
        first_id = first.id
    # the run stops after step 1 (its checkpoint); resuming continues the same W&B run
    with Trainer(run_config(tiny_base, arithmetic_files, out, steps=2, save_every=1,
                            report_to="wandb"), resume=True) as trainer:
        assert trainer.step_done == 1
        assert trainer.metrics_log.backend.id == first_id
        assert trainer.metrics_log.backend.name == "my-run"
    assert (out / "wandb-run-id").read_text() == first_id
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(first_id) for r in runs)
    os.environ.pop("WANDB_RUN_ID", None)

"""What a run leaves behind: final/ is a model (the base's dtype, no trainer state, a hub model
card), disk space is stated and checked before every write, a directory holding a run is not
overwritten by accident, and W&B keeps one run across a resume."""

import json
import os
from pathlib import Path

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
    assert first.project == "nftune"  # neither wandb_project nor $WANDB_PROJECT set
    os.environ.pop("WANDB_RUN_ID", None)


def _completions(out):
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_completions_show_a_few_prompts_answers_rewards_and_r_hat(tiny_base, arithmetic_files,
                                                                   tmp_path):
    """Every log_completions_every steps, the first prompts' K answers as scored (before
    filtering): rewards 0/1, r̂ their mean, truncated answers wrong; TensorBoard gets the
    table as text; a resume redoes the steps after its checkpoint, their rows with them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nftune.data import load_questions

    out, k = tmp_path / "run", 4
    cfg = run_config(tiny_base, arithmetic_files, out, steps=3, save_every=2,
                     answers_per_prompt=k, log_completions_every=2, log_completions_prompts=1,
                     report_to="tensorboard")
    train(cfg, progress=False)
    rows = _completions(out)
    assert [r["step"] for r in rows] == [2] * k  # step 2 only (every 2 of 3 steps)
    assert len({r["question_id"] for r in rows}) == 1  # one prompt's K answers
    problems = {q.id: q for q in load_questions(str(arithmetic_files["train"]))}
    question = problems[rows[0]["question_id"]]
    assert all(r["problem"] == question.problem and r["reference"] == question.answer
               for r in rows)
    rewards = [r["reward"] for r in rows]
    assert set(rewards) <= {0.0, 1.0}
    assert all(r["r_hat"] == pytest.approx(sum(rewards) / k) for r in rows)
    assert all(r["reward"] == 0.0 for r in rows if r["truncated"])
    assert all(isinstance(r["completion"], str) and r["response_tokens"] >= 1 for r in rows)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [t for tag in events.Tags()["tensors"] if tag.startswith("completions")
             for t in events.Tensors(tag)]
    assert [t.step for t in texts] == [2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert question.problem.replace("|", "\\|") in table
    # resumed from step 2's checkpoint: nothing after it to redo, the rows stay once
    with Trainer(cfg, resume=True) as trainer:
        assert trainer.step_done == 2
    assert [r["step"] for r in _completions(out)] == [2] * k


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_merged_weights_are_w_plus_scaled_ba_one_layer_at_a_time(tiny_base, arithmetic_files,
                                                                 tmp_path, base_dtype):
    """Each adapted weight comes out as W + (α / r) · B A, by hand from the adapter's own
    matrices (B set non-zero), summed in float32 and stored in W's dtype; the model's own W is
    untouched; final/ written tensor by tensor loads in plain transformers to the outputs of
    PEFT's own merge_and_unload (a second method)."""
    import copy

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nftune.artifact import save_model_weights
    from nftune.policy import build_policy, merged_weights

    cfg = run_config(tiny_base, arithmetic_files, tmp_path / "run", lora_rank=4,
                     lora_alpha=12.0, base_dtype=base_dtype)
    model, _ = build_policy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w_before = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (w_before.float() + 3.0 * (b.float() @ a.float())).to(w_before.dtype)
    merged = dict(merged_weights(model))
    got = merged["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == getattr(torch, base_dtype)
    assert torch.equal(got, expected)
    assert torch.equal(layer.base_layer.weight, w_before)  # the model is left as it was
    assert not any(".lora_" in n or ".base_layer." in n for n in merged)
    unadapted = "model.layers.0.input_layernorm.weight"
    assert torch.equal(merged[unadapted], model.get_base_model().state_dict()[unadapted])

    out = tmp_path / "final"
    save_model_weights(model, out, torch.float32)
    reference = copy.deepcopy(model).merge_and_unload()  # PEFT merges in W's dtype
    saved = load_file(str(out / "model.safetensors"))
    tied = model.get_base_model().config.tie_word_embeddings
    assert set(saved) == set(reference.state_dict()) - ({"lm_head.weight"} if tied else set())
    ulp = 1e-6 if base_dtype == "float32" else 2**-7  # PEFT adds in bf16: a rounding apart
    for name, tensor in saved.items():
        want = reference.state_dict()[name].float()
        assert torch.allclose(tensor, want, rtol=ulp, atol=ulp * want.abs().max()), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, loaded.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(1))
    if base_dtype == "float32":
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5)


def test_weights_written_in_shards_past_the_limit_load_as_one_model(tiny_base, tmp_path):
    """Past ``max_shard_bytes`` the weights go to numbered shards with the hub's index file,
    which transformers loads to the same tensors."""
    from transformers import AutoModelForCausalLM

    from nftune.artifact import save_model_weights, write_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    state = model.state_dict()
    names = [n for n in state if n != "lm_head.weight" or not model.config.tie_word_embeddings]
    shapes = [(n, state[n].dtype, tuple(state[n].shape)) for n in names]
    largest = max(state[n].numel() * 4 for n in names)
    files = write_weights(tmp_path, shapes, ((n, state[n]) for n in names), largest)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(names)
    assert index["metadata"]["total_size"] == sum(state[n].numel() * 4 for n in names)
    model.config.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(ValueError, match="expected"):  # tensors out of the planned order
        write_weights(tmp_path / "..", shapes, ((n, state[n]) for n in reversed(names)))
    save_model_weights(model, tmp_path / "whole", torch.bfloat16)
    assert safetensors_dtypes(tmp_path / "whole" / "model.safetensors") == {"BF16"}


def test_wandb_gets_the_project_and_a_completions_table(tiny_base, arithmetic_files, tmp_path,
                                                       monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    out = tmp_path / "env-run"
    with Trainer(run_config(tiny_base, arithmetic_files, out, steps=1, report_to="wandb",
                            log_completions_every=1)) as trainer:
        trainer.step()
        assert trainer.metrics_log.backend.project == "from-the-environment"
    rows = _completions(out)
    assert len(rows) == 2 * 4  # log_completions_prompts (default 2) × K
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/completions_*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["question_id", "problem", "reference", "completion"]
    assert [row[3] for row in table["data"]] == [r["completion"] for r in rows]
    out = tmp_path / "key-run"  # the config key wins over the environment
    with Trainer(run_config(tiny_base, arithmetic_files, out, steps=1, report_to="wandb",
                            wandb_project="from-the-config")) as trainer:
        assert trainer.metrics_log.backend.project == "from-the-config"
    os.environ.pop("WANDB_RUN_ID", None)


@pytest.fixture
def hub_calls(monkeypatch):
    """The hub reachable and a token there, as far as nftune can tell; the two requests it
    makes recorded instead of sent (the network boundary)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw, self.token))

    def create_commit(self, repo_id, operations, **kw):
        sent = {op.path_in_repo: op.path_or_fileobj for op in operations}
        calls.append(("create_commit", repo_id, kw, sent))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_sends_final_with_its_card_and_a_lora_run_the_merged_model(
        tiny_base, arithmetic_files, tmp_path, hub_calls):
    from helpers import run_cli

    out = tmp_path / "run"
    train(run_config(tiny_base, arithmetic_files, out, steps=1, lora_rank=4, lora_alpha=8),
          progress=False)
    final = out / "final"
    done = run_cli("push", out, "me/tiny-nft", "--private")
    assert done.returncode == 0, done.stderr
    assert "https://huggingface.co/me/tiny-nft/commit/1" in done.stdout
    (_, repo, kw, token), (_, repo2, _, sent) = hub_calls
    assert repo == repo2 == "me/tiny-nft" and kw["private"] and token == "hf_test_token"
    # every file of final/ but the adapter, each from its file; the card as it was written
    expected = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()
                and not p.relative_to(final).as_posix().startswith("adapter/")}
    assert set(sent) == expected and "model.safetensors" in sent
    assert sent["README.md"] == (final / "README.md").read_bytes()
    assert all(Path(sent[n]) == final / n for n in sent if n != "README.md")

    hub_calls.clear()
    assert run_cli("push", final, "me/tiny-nft-lora", "--adapter").returncode == 0
    sent = hub_calls[1][3]
    assert set(sent) == {p.name for p in (final / "adapter").iterdir()} | {"README.md"}
    assert "adapter_config.json" in sent and "model.safetensors" not in sent
    card = sent["README.md"].decode()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "peft" and "lora" in header["tags"]
    assert header["base_model"] == yaml.safe_load(
        (final / "README.md").read_text().split("---\n")[1])["base_model"]


def test_push_fails_in_one_line_before_any_request(tiny_base, arithmetic_files, tmp_path,
                                                    hub_calls, monkeypatch):
    from helpers import run_cli

    from nftune.hub import plan_upload

    out = tmp_path / "run"
    train(run_config(tiny_base, arithmetic_files, out, steps=1), progress=False)
    assert "adapter/" not in " ".join(plan_upload(out).files)
    cases = [(tmp_path / "nothing-here", {}, "no model to push"),
             (out, {"adapter": True}, "--adapter is for a LoRA run"),
             (out, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
             (out, {"HF_TOKEN": ""}, "no Hugging Face token")]
    for run_dir, change, message in cases:
        with monkeypatch.context() as m:
            for key, value in change.items():
                if key.isupper():
                    m.setenv(key, value)
            from huggingface_hub import constants

            m.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # none stored
            extra = ["--adapter"] if change.get("adapter") else []
            done = run_cli("push", run_dir, "me/x", *extra)
        assert done.returncode == 2 and message in done.stderr, (message, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
    assert hub_calls == []  # nothing was sent

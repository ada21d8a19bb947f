"""An objective registered from outside the package trains through `nftune train` with no
other change: the registry's declarations reach the config and the loop."""

import json

import pytest

from nftune.cli import main
from nftune.plugins import import_plugin

TOY = '''
"""A user's objective: α-weighted likelihood of correct answers, keeping whole groups."""
import torch

from nftune.objectives import register_objective, token_mean_loss

CALLS = []


@register_objective("toy_sft", dynamic_sampling=False, whole_groups=True,
                    signal=lambda reward, r_hat: reward > 0)
def toy_sft(x, *, alpha=1.0):
    groups, counts = torch.unique(x.group_ids, return_counts=True)
    CALLS.append({"alpha": alpha, "group_sizes": counts.tolist(), "rows": len(x.reward)})
    pos = -alpha * x.reward[:, None] * x.log_ratio
    return token_mean_loss({"loss": pos, "loss_pos": pos, "loss_neg": 0 * pos}, x)
'''


def test_a_plugin_objective_trains_through_the_cli(tiny_base, arithmetic_files, tmp_path):
    plugin = tmp_path / "toy_objective.py"
    plugin.write_text(TOY)
    out = tmp_path / "run"
    k = 4
    rc = main(["train", "--model", str(tiny_base), "--train-data",
               str(arithmetic_files["train"]), "--output-dir", str(out), "--algo", "toy_sft",
               "--steps", "2", "--plugins", str(plugin), "--objective-args", "alpha=2.5",
               "--template", "raw", "--prompts-per-step", "4", "--answers-per-prompt", str(k),
               "--max-new-tokens", "24", "--minibatches", "1", "--micro-batch-tokens", "60",
               "--lr", "1e-3", "--save-every", "0", "--verify-workers", "1", "--no-progress"])
    assert rc == 0
    calls = import_plugin(str(plugin)).CALLS  # the module the run imported (one per path)
    assert calls and all(c["alpha"] == 2.5 for c in calls)
    # whole_groups: a tight micro-batch budget still never splits a question's K answers
    assert all(size == k for c in calls for size in c["group_sizes"])
    assert any(c["rows"] < 4 * k for c in calls)  # ... and the budget did split mini-batches
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["kept_fraction"] == 1.0 for r in rows)  # dynamic_sampling=False by default
    assert "clip_fraction" not in rows[0]  # it clips nothing, so logs no clip_fraction
    saved = (out / "config.yaml").read_text()
    assert "algo: toy_sft" in saved and "alpha=2.5" in saved
    assert (out / "final" / "model.safetensors").exists()


def test_plugin_errors_name_the_problem(tmp_path):
    from nftune.config import build_config

    with pytest.raises(FileNotFoundError, match="nope.py"):
        build_config(None, {"plugins": str(tmp_path / "nope.py")})
    with pytest.raises(ValueError, match="plugins: cannot import"):
        build_config(None, {"plugins": "no_such_module_xyz"})
    with pytest.raises(ValueError, match="alpha: not a hyper-parameter of nft"):
        build_config(None, {"objective_args": "alpha=1"})
    with pytest.raises(ValueError, match="objective_args: expected name=value"):
        build_config(None, {"algo": "nft", "objective_args": "eps"})


def test_compare_accepts_an_objective_a_plugin_registers(tiny_base, arithmetic_files, tmp_path):
    import yaml
    from helpers import run_cli, tiny_run_values

    plugin = tmp_path / "cmp_objective.py"
    plugin.write_text(TOY.replace("toy_sft", "toy_cmp"))
    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump(tiny_run_values(
        tiny_base, arithmetic_files, steps=1, minibatches=1, eval_every=1, eval_k=1,
        eval_data=str(arithmetic_files["test"]))))
    out = tmp_path / "cmp"
    # the plugin named on the command line: --algos knows its objective before the check
    done = run_cli("compare", "--config", config, "--algos", "nft,toy_cmp", "--seeds", "1",
                   "--output-dir", out, "--no-progress", "--plugins", plugin)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"nft", "toy_cmp"}
    # the plugin's run trained with its objective, and its config names the plugin for resume
    saved = (out / "runs" / "toy_cmp-seed0" / "config.yaml").read_text()
    assert "algo: toy_cmp" in saved and "cmp_objective.py" in saved
    # without the plugin the name is refused, naming it
    refused = run_cli("compare", "--config", config, "--algos", "toy_cmp2", "--seeds", "1",
                      "--output-dir", tmp_path / "other", "--no-progress")
    assert refused.returncode == 2 and "toy_cmp2" in refused.stderr

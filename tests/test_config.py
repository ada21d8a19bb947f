"""Configuration: per-algorithm defaults from the paper, YAML + CLI overrides, clear errors."""

from pathlib import Path

import pytest

from nftune.config import build_config, config_markdown, parse_overrides

PG_CLIPS = {"clip_low": 0.2, "clip_high": 0.28}


@pytest.mark.parametrize("algo, dynamic, overlong, hparams", [
    ("nft", True, False, {"weight": "dr_grpo", "eps": 1.0}),
    ("rft", True, False, {"weight": "one"}),
    ("grpo", False, False, PG_CLIPS),
    ("dr_grpo", False, False, PG_CLIPS),
    ("dapo", True, True, PG_CLIPS),
    ("infonca", True, False, {"beta": 0.1, "sft_coef": 1.0}),
])
def test_paper_defaults_per_algorithm(algo, dynamic, overlong, hparams):
    cfg = build_config(None, {"algo": algo})
    assert (cfg.dynamic_sampling, cfg.overlong_shaping) == (dynamic, overlong)
    assert cfg.objective_hparams() == hparams
    for key in ("eps", "weight", "clip_low", "clip_high", "beta", "sft_coef"):
        assert getattr(cfg, key) == hparams.get(key)  # saved config.yaml shows what ran
    assert cfg.temperature == 1.0 and cfg.top_k == 0 and cfg.top_p == 1.0


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: rft\nlr: 2.0e-6\nsteps: 7\ndynamic_sampling: false\n")
    cfg = build_config(str(path), parse_overrides(["--steps", "9", "--eval-k=4",
                                                   "--eval-temperature", "1.0",
                                                   "--weight", "grpo"]))
    assert (cfg.algo, cfg.lr, cfg.steps, cfg.eval_k) == ("rft", 2e-6, 9, 4)
    assert cfg.dynamic_sampling is False and cfg.weight == "grpo"


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="did you mean prompts_per_step"):
        build_config(None, {"prompts_per_stp": 3})
    with pytest.raises(ValueError, match="steps: expected int"):
        build_config(None, {"steps": "many"})
    with pytest.raises(ValueError, match="algo"):
        build_config(None, {"algo": "ppo"})
    with pytest.raises(ValueError, match="weight: not a hyper-parameter of grpo"):
        build_config(None, {"algo": "grpo", "weight": "one"})
    with pytest.raises(ValueError, match="eps: not a hyper-parameter of infonca"):
        build_config(None, {"algo": "infonca", "eps": 0.5})
    for eps in (1.5, 0.0, -1):  # above 1 the on-policy loss would be −ω·log ε, not 0
        with pytest.raises(ValueError, match=r"eps: .*must lie in \(0, 1\]"):
            build_config(None, {"algo": "nft", "eps": eps})
    with pytest.raises(ValueError, match="overlong_shaping: nft"):
        build_config(None, {"algo": "nft", "overlong_shaping": True})
    with pytest.raises(ValueError, match="missing value"):
        parse_overrides(["--steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        build_config("nope.yaml")


def test_docs_config_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown()


def test_engine_settings_that_cannot_work_are_errors():
    assert build_config(None, {}).old_logprobs == "generate"  # hf records π_old while sampling
    assert build_config(None, {"rollout_engine": "vllm"}).old_logprobs == "recompute"
    with pytest.raises(ValueError, match="old_logprobs: generate needs an engine"):
        build_config(None, {"rollout_engine": "vllm", "old_logprobs": "generate"})
    with pytest.raises(ValueError, match="tis_cap: needs rollout_engine vllm"):
        build_config(None, {"tis_cap": 2.0})
    with pytest.raises(ValueError, match=r"tis_cap: .*\(infonca with vllm\)"):
        build_config(None, {"rollout_engine": "vllm", "algo": "infonca", "tis_cap": 2.0})
    with pytest.raises(ValueError, match="rollout_engine: unknown 'sglang'"):
        build_config(None, {"rollout_engine": "sglang"})

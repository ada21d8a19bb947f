"""`nftune compare` on a tiny model: table, plots, JSON, skipping finished runs, --report."""

import json

import yaml
from helpers import run_cli, tiny_run_values


def compare(*args):
    return run_cli("compare", *args)


def test_compare_runs_reports_and_resumes(tiny_base, arithmetic_files, tmp_path):
    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump(tiny_run_values(
        tiny_base, arithmetic_files, steps=2, minibatches=1, eval_every=1,
        eval_data=str(arithmetic_files["test"]), eval_k=2, eval_temperature=1.0,
        max_gen_batches=2)))
    out = tmp_path / "cmp"
    done = compare("--config", str(config), "--algos", "nft,rft", "--seeds", "2",
                   "--output-dir", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"nft", "rft"}
    for algo, s in result["summary"].items():
        assert s["seeds"] == [0, 1]
        # each seed's accuracy is its run's last held-out evaluation, read from its own log
        finals = []
        for seed in (0, 1):
            log = out / "runs" / f"{algo}-seed{seed}" / "metrics.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            finals.append([r for r in rows if "eval/test/avg@2" in r][-1]["eval/test/avg@2"])
        assert s["accuracy"] == finals
        mean, std = s["accuracy_mean_std"]  # sample std of two values: |a − b| / √2
        assert abs(mean - (finals[0] + finals[1]) / 2) < 1e-12
        assert abs(std - abs(finals[0] - finals[1]) / 2 ** 0.5) < 1e-12
    table = (out / "results.md").read_text()
    assert "| base model |" in table and "| nft |" in table and " ± " in table
    assert (out / "curves.png").stat().st_size > 10_000

    again = compare("--config", str(config), "--algos", "nft,rft", "--seeds", "2",
                    "--output-dir", str(out), "--no-progress")
    assert again.returncode == 0 and again.stdout.count("skip ") == 4

    rebuilt = compare("--report", str(out))
    assert rebuilt.returncode == 0 and "| rft |" in rebuilt.stdout


def test_sweep_labels_and_bad_algo(tiny_base, arithmetic_files, tmp_path):
    from nftune.compare import plan_runs

    runs = plan_runs(["nft"], [0, 1], ("eps", ["0.1", "1.0"]))
    assert [r["label"] for r in runs] == ["nft eps=0.1"] * 2 + ["nft eps=1.0"] * 2
    assert runs[0]["overrides"] == {"eps": "0.1"} and runs[1]["dir"] == "nft-eps0.1-seed1"
    done = compare("--algos", "nft,ppo", "--config", str(tmp_path / "missing.yaml"))
    # the unknown algorithm is named before any file is read
    assert done.returncode == 2 and "--algos: unknown ['ppo']" in done.stderr

"""`nftune compare` on a tiny model: table, plots, JSON, skipping finished runs, --report."""

import json
import shutil

import pytest
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
    assert set(result["summary"]) == {"nft", "rft"} and result["reference"] == "nft"
    questions = len(arithmetic_files["test"].read_text().splitlines())
    base = json.loads((out / "base_eval.json").read_text())
    # the base is evaluated twice with different seeds: one measures, one sorts by difficulty
    assert {"sampled", "sampled_seed4321", "greedy"} <= set(base)
    assert sum(result["bins"].values()) == questions
    # bins from the second evaluation; the base's "before" per bin from the first
    second, first = base["sampled_seed4321"]["per_question"], base["sampled"]["per_question"]
    hard = [i for i, rate in enumerate(second) if rate < 1 / 3]
    assert result["bins"]["hard"] == len(hard)
    assert hard  # the tiny base gets most questions wrong
    base_hard = 100 * sum(first[i] for i in hard) / len(hard)
    finals = {}
    for algo, s in result["summary"].items():
        assert s["seeds"] == [0, 1]
        finals[algo] = []
        for seed in (0, 1):
            evaluated = json.loads((out / "runs" / f"{algo}-seed{seed}" / "final_eval.json")
                                   .read_text())
            per_question = evaluated["sampled"]["per_question"]
            assert len(per_question) == questions and evaluated["sampled"]["k"] == 2
            assert evaluated["greedy"]["k"] == 1
            assert abs(evaluated["sampled"]["accuracy"] - sum(per_question) / questions) < 1e-9
            finals[algo].append(evaluated["sampled"]["accuracy"])
        assert s["accuracy"] == finals[algo]
        mean, low, high = s["accuracy_mean_ci"]  # two values: ± t(0.975, 1) · |a − b| / 2
        a, b = finals[algo]
        assert abs(mean - (a + b) / 2) < 1e-12
        assert abs((high - low) / 2 - 12.706 * abs(a - b) / 2) < 1e-9
    paired = result["paired"]["rft"]["sampled"]
    assert paired["per_seed"] == {"0": finals["nft"][0] - finals["rft"][0],
                                  "1": finals["nft"][1] - finals["rft"][1]}
    def trained(algo):  # runs that took an optimizer step (a tiny run may keep no group)
        return [m for m in result["runs"][algo]
                if any(r.get("optimizer_steps") for r in m["metrics"])]

    assert trained("nft") and trained("rft")
    assert all(0 < m["grad_share_wrong"] < 1 for m in trained("nft"))  # NFT learns from them
    assert all(m["grad_share_wrong"] == 0 for m in trained("rft"))  # RFT drops them
    # the curve set is the final set here: step 0 of every curve is the base's accuracy
    assert abs(result["base_curve_accuracy"] - base["sampled"]["accuracy"]) < 1e-12
    start = base["sampled"]["accuracy"]
    for algo, members in result["runs"].items():
        for m in members:
            points = [(r["step"], r[m["eval_key"]]) for r in m["metrics"] if m["eval_key"] in r]
            assert [t for t, _ in points] == [1, 2]  # eval_every 1, two steps
            (_, a1), (_, a2) = points  # trapezoids over [0, 1] and [1, 2], divided by 2 steps
            assert abs(m["curve_area"] - ((start + a1) / 2 + (a1 + a2) / 2) / 2) < 1e-12
            clipped = [r["clip_fraction"] for r in m["metrics"] if "clip_fraction" in r]
            if algo == "rft":  # RFT trains on no wrong answer: nothing of theirs is clipped
                assert all(c == 0 for c in clipped)
            if clipped:
                assert abs(m["clip_fraction"] - sum(clipped) / len(clipped)) < 1e-12
    table = (out / "results.md").read_text()
    assert "Learning speed on the held-out curve" in table
    assert "slope over the last quarter" in table
    assert "still rises" not in table  # two curve points: one in the last quarter, no slope
    assert "| base model |" in table and "| nft |" in table and "| nft − rft |" in table
    assert "nft ≥ RFT" in table and "Compute: 4 runs" in table
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "difficulty.png").stat().st_size > 10_000
    difficulty = table[table.index("Sampled accuracy by difficulty"):]
    assert f"| base model | {base_hard:.1f} |" in difficulty

    again = compare("--config", str(config), "--algos", "nft,rft", "--seeds", "2",
                    "--output-dir", str(out), "--no-progress")
    assert again.returncode == 2 and "--resume" in again.stderr
    again = compare("--config", str(config), "--algos", "nft,rft", "--seeds", "2",
                    "--output-dir", str(out), "--no-progress", "--resume")
    assert again.returncode == 0 and again.stdout.count("skip ") == 4
    changed = compare("--config", str(config), "--algos", "nft,rft", "--seeds", "2",
                      "--output-dir", str(out), "--no-progress", "--resume", "--lr", "0.5")
    assert changed.returncode == 2 and "other shared settings (lr)" in changed.stderr

    rebuilt = compare("--report", str(out))
    assert rebuilt.returncode == 0 and "| rft |" in rebuilt.stdout


def test_confidence_intervals_bins_and_verdicts_by_hand():
    from nftune.compare import _verdict, difficulty_bins, mean_ci

    # 1..5: mean 3, sample std √2.5, t(0.975, 4) = 2.776 → half-width 2.776 · √2.5 / √5
    mean, low, high = mean_ci([1, 2, 3, 4, 5])
    assert mean == 3 and abs(high - 3 - 2.776 * (2.5 / 5) ** 0.5) < 1e-12 and low < 3
    assert mean_ci([0.4])[0] == 0.4 and mean_ci([0.4])[1] != mean_ci([0.4])[1]  # NaN bound
    rates = [0.0, 0.25, 0.5, 0.625, 0.75, 1.0]
    assert difficulty_bins({"sampled": {"per_question": [9] * 6},
                            "sampled_seed4321": {"per_question": rates}}) == {
        "hard": [0, 1], "medium": [2, 3], "easy": [4, 5]}
    assert _verdict([0.01, 0.05]) == "supported"
    assert _verdict([-0.05, -0.01]) == "not supported"
    assert _verdict([-0.01, 0.02]).startswith("inconclusive")
    assert _verdict([-0.015, 0.02], -0.02) == "supported"  # "close to": within 2 points


def test_late_slope_and_its_verdict_by_hand():
    from nftune.compare import late_slope, verdicts

    line = [(t, t / 100) for t in range(10, 90, 10)]  # a straight line: 1 point per step
    # the last quarter of 80 steps is steps 60, 70, 80: slope 0.01 per step
    assert abs(late_slope(line) - 0.01) < 1e-12
    # steep, then flat from step 60: only the flat part counts
    assert abs(late_slope([(10, 0.1), (20, 0.5), (60, 0.6), (70, 0.6), (80, 0.6)])) < 1e-12
    # noise symmetric about the middle point: least squares gives 0
    assert abs(late_slope([(60, 0.5), (70, 0.7), (80, 0.5)])) < 1e-12
    # (60, .5), (80, .8), half the span: last half = steps ≥ 40 → slope .3 / 20
    assert abs(late_slope([(20, 0.1), (60, 0.5), (80, 0.8)], share=0.5) - 0.015) < 1e-12
    nan = late_slope([(1, 0.2), (2, 0.3)])  # only step 2 lies in the last quarter
    assert nan != nan and late_slope([]) != late_slope([])

    rising = {"nft": {"late_slope_mean_ci": [0.0005, 0.0003, 0.0007]},
              "rft": {"late_slope_mean_ci": [0.0001, -0.0002, 0.0004]}}
    lines = verdicts(rising, {})
    assert ("nft's curve still rises over the last quarter of training: supported — slope "
            "+5.0 [+3.0, +7.0] points per 100 steps") in lines[0]
    assert lines[1].startswith("rft's curve still rises over the last quarter of training: "
                               "inconclusive") and "+1.0 [-2.0, +4.0]" in lines[1]


def test_learning_speed_by_hand(tmp_path):
    from nftune.compare import _speed_verdict, curve_area, curve_base_accuracy, steps_to_gain

    # from (0, .2): trapezoids 10 · (.2 + .4) / 2 = 3 and 10 · (.4 + .6) / 2 = 5 over 20 steps
    assert abs(curve_area([(10, 0.4), (20, 0.6)], 0.2) - 0.4) < 1e-12
    assert abs(curve_area([(20, 0.6), (10, 0.4)]) - 0.5) < 1e-12  # no base: from the first
    # final = mean(.6, .6) = .6, gain .4 → target .56, crossed between steps 10 (.4) and 20 (.6)
    assert abs(steps_to_gain([(10, 0.4), (20, 0.6), (30, 0.6)], 0.2) - 18.0) < 1e-12
    assert abs(steps_to_gain([(10, 0.7), (20, 0.6), (30, 0.6)], 0.2) - 10 * 0.36 / 0.5) < 1e-12
    nan = float("nan")
    assert steps_to_gain([(10, 0.1), (20, 0.1)], 0.2) != steps_to_gain([], 0.2)  # NaN ≠ NaN
    assert steps_to_gain([(10, 0.4)], nan) != steps_to_gain([(10, 0.4)], nan)
    # fewer steps is better: the reference's difference CI wholly below 0 supports "faster"
    assert _speed_verdict({"mean": -5.0, "ci": [-8.0, -2.0]}) == "supported"
    assert _speed_verdict({"mean": 5.0, "ci": [2.0, 8.0]}) == "not supported"

    rows = [f'{{"problem": "{i}", "answer": "{i}"}}' for i in range(4)]
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "curve.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (tmp_path / "other.jsonl").write_text("\n".join(rows[1:3]) + "\n")
    base = {"sampled": {"per_question": [0.5, 0.25, 1.0, 1.0]}}
    plan = {"base": {"eval_data": "elsewhere/curve.jsonl"},  # found beside plan.json
            "final_eval": {"eval_data": str(tmp_path / "test.jsonl")}}
    assert curve_base_accuracy(plan, base, tmp_path) == 0.375  # the first two questions
    plan["base"]["eval_data"] = str(tmp_path / "other.jsonl")  # not test's head: unknown
    assert curve_base_accuracy(plan, base, tmp_path) != curve_base_accuracy(plan, base, tmp_path)
    assert curve_base_accuracy({"base": {"eval_data": str(tmp_path / "test.jsonl")}}, base,
                               tmp_path) == 0.6875  # no final set: the curve set is it


def test_sweep_labels_and_bad_algo(tiny_base, arithmetic_files, tmp_path):
    from nftune.compare import plan_runs

    runs = plan_runs(["nft"], [0, 1], ("eps", ["0.1", "1.0"]))
    assert [r["label"] for r in runs] == ["nft eps=0.1"] * 2 + ["nft eps=1.0"] * 2
    assert runs[0]["overrides"] == {"eps": "0.1"} and runs[1]["dir"] == "nft-eps0.1-seed1"
    done = compare("--algos", "nft,ppo", "--config", str(tmp_path / "missing.yaml"))
    # the unknown algorithm is named before any file is read
    assert done.returncode == 2 and "--algos: unknown ['ppo']" in done.stderr


def finished_two_step_comparison(tiny_base, arithmetic_files, tmp_path):
    """One NFT run compared for 2 steps (checkpoint every step): its config values, the
    compare arguments, the output directory and the run's directory."""
    values = tiny_run_values(tiny_base, arithmetic_files, steps=2, save_every=1,
                             keep_checkpoints=1, eval_every=1, eval_k=2,
                             eval_data=str(arithmetic_files["test"]), eval_temperature=1.0,
                             max_gen_batches=2)
    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "cmp"
    args = ("--config", str(config), "--algos", "nft", "--seeds", "1", "--output-dir",
            str(out), "--no-progress")
    assert compare(*args).returncode == 0
    return values, args, out, out / "runs" / "nft-seed0"


def test_more_steps_on_resume_extend_a_comparison(tiny_base, arithmetic_files, tmp_path):
    """A finished comparison with more --steps trains each run on from its last checkpoint:
    with a constant learning rate the result is the run trained that long from the start."""
    from helpers import same_runs

    values, args, out, run = finished_two_step_comparison(tiny_base, arithmetic_files,
                                                          tmp_path)
    short_eval = json.loads((run / "final_eval.json").read_text())
    longer = compare(*args, "--resume", "--steps", "4")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "from 2 to 4 steps" in longer.stdout
    assert "resumed from" in (run / "train.log").read_text()  # not started over
    # the 2-step model's evaluation is kept beside the 4-step one's
    assert json.loads((run / "final_eval.step2.json").read_text()) == short_eval
    assert (run / "final_eval.json").exists()
    # the second method: the same run trained 4 steps in one go
    direct = tmp_path / "direct.yaml"
    direct.write_text(yaml.safe_dump({**values, "steps": 4, "algo": "nft", "seed": 0,
                                      "output_dir": str(tmp_path / "direct")}))
    assert run_cli("train", "--config", str(direct), "--no-progress").returncode == 0

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    extended = rows(run / "metrics.jsonl")
    assert [r["step"] for r in extended] == [1, 2, 3, 4]
    assert same_runs(extended, rows(tmp_path / "direct" / "metrics.jsonl"))
    assert compare(*args, "--resume", "--steps", "4").stdout.count("skip ") == 1
    fewer = compare(*args, "--resume", "--steps", "3")
    assert fewer.returncode == 2 and "never shortened" in fewer.stderr
    from nftune.compare import check_extension

    with pytest.raises(ValueError, match="only with lr_schedule constant"):
        check_extension({"steps": 2, "lr_schedule": "cosine"},
                        {"steps": 4, "lr_schedule": "cosine"}, out)


def test_a_run_cut_before_its_final_model_is_extended_too(tiny_base, arithmetic_files,
                                                          tmp_path):
    """A run whose last checkpoint was saved under the shorter plan but which never wrote
    final/ (cut between the two) resumes under a longer --steps instead of being refused."""
    _, args, _, run = finished_two_step_comparison(tiny_base, arithmetic_files, tmp_path)
    shutil.rmtree(run / "final")
    (run / "final_eval.json").unlink()
    longer = compare(*args, "--resume", "--steps", "3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    assert steps == [1, 2, 3]
    assert yaml.safe_load((run / "final" / "nftune_config.yaml").read_text())["steps"] == 3

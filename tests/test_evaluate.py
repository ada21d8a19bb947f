"""Evaluation: pass@k by hand, the six benchmarks graded on their own golds, a tiny model."""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from nftune.data import Question
from nftune.evaluate import EvalResult, format_table, pass_at_k

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"
SIX = ["aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva"]


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 − C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(32, 1, 1) == pytest.approx(1 / 32)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(2, 1, 3)


def test_table_layout_follows_table_1():
    results = [EvalResult("aime24", 32, 0.25, 0.5, 30), EvalResult("math500", 1, 0.75, 0.75, 500)]
    table = format_table(results, "m")
    assert table.splitlines()[0] == "| Model | AIME24 avg@32 | MATH500 | Avg |"
    assert table.splitlines()[2] == "| m | 25.0 | 75.0 | 50.0 |"
    assert "AIME24 pass@32 50.0" in table


def eval_cli(*args):
    return run_cli("eval", *args)


@pytest.mark.skipif(not BENCH.exists(), reason="../shared/data/bench not present")
def test_gold_answers_score_100_and_shuffled_answers_near_0(tmp_path):
    gold_rows, shuffled_rows, same_text = [], [], {}
    for name in SIX:
        rows = [json.loads(line) for line in (BENCH / f"{name}.jsonl").open()]
        random.Random(1).shuffle(rows)
        others = [r["answer"] for r in rows[1:] + rows[:1]]  # every item gets another's answer
        same_text[name] = sum(o.strip() == r["answer"].strip()
                              for r, o in zip(rows, others, strict=True)) / len(rows)
        for r, other in zip(rows, others, strict=True):
            gold_rows.append({"benchmark": name, "id": r["id"],
                              "response": f"So the answer is \\boxed{{{r['answer']}}}."})
            shuffled_rows.append({"benchmark": name, "id": r["id"],
                                  "response": f"\\boxed{{{other}}}"})
    for rows, label in ((gold_rows, "gold"), (shuffled_rows, "shuffled")):
        path = tmp_path / f"{label}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = eval_cli("--responses", str(path), "--data-dir", str(BENCH), "--template",
                        "boxed", "--output", str(tmp_path / label))
        assert done.returncode == 0, done.stderr
        summary = json.loads((tmp_path / f"{label}.json").read_text())["summary"]
        assert set(summary) == set(SIX)
        for name, s in summary.items():
            if label == "gold":
                assert s["avg_at_k"] == 1.0, name
            else:  # only answers that are literally the same (e.g. two AIME answers 25) pass
                assert s["avg_at_k"] <= same_text[name] + 0.01, (name, s)
        assert "| Model |" in done.stdout and "grading:" in done.stdout
    assert (tmp_path / "gold.md").read_text().count("## ") == 6


def test_bad_responses_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"benchmark": "aime24"}\n')
    done = eval_cli("--responses", str(path))
    assert done.returncode == 2 and "row 1: missing field 'id'" in done.stderr


def test_tiny_model_end_to_end(tiny_base, arithmetic_files, tmp_path):
    done = eval_cli("--model", str(tiny_base), "--benchmarks", str(arithmetic_files["test"]),
                    "--template", "raw", "--k", "2", "--max-new-tokens", "24",
                    "--output", str(tmp_path / "out"), "--verify-workers", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    items = result["items"]["test"]
    assert len(items) == 16 and all(len(i["responses"]) == 2 for i in items)
    assert result["summary"]["test"]["avg_at_k"] == pytest.approx(
        sum(sum(i["correct"]) for i in items) / 32)
    assert "generation:" in done.stdout and "tokens/s" in done.stdout
    # the protocol, what was changed from it, the engine and the versions travel with the table
    assert "protocol: nft-paper" in done.stdout and "changed: --template raw, --samples 2" \
        in done.stdout
    settings = result["settings"]
    assert settings["protocol"] == "nft-paper" and settings["engine"] == "hf"
    assert settings["overrides"] == ["--template raw", "--samples 2", "--max-new-tokens 24"]
    assert {"nftune", "torch", "transformers", "math-verify"} <= set(settings["versions"])


@pytest.mark.skipif(not BENCH.exists(), reason="../shared/data/bench not present")
def test_responses_in_either_form_are_graded_without_a_template(tmp_path):
    """Someone else's outputs: boxed on one half of each set, Answer: lines on the other; no
    --template. Both forms are accepted everywhere, and the output says which extraction."""
    rows = []
    for name in SIX:
        for i, r in enumerate(json.loads(line) for line in (BENCH / f"{name}.jsonl").open()):
            response = (f"Let me work through this carefully.\nSo the final result is "
                        f"$\\boxed{{{r['answer']}}}$." if i % 2 == 0 else
                        f"Let me work through this carefully.\nAnswer: {r['answer']}")
            rows.append({"benchmark": name, "id": r["id"], "response": response})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = eval_cli("--responses", str(path), "--data-dir", str(BENCH),
                    "--output", str(tmp_path / "mixed"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "mixed.json").read_text())["summary"]
    assert {name: s["avg_at_k"] for name, s in summary.items()} == {name: 1.0 for name in SIX}
    assert "answer extraction: auto" in done.stdout


def test_pass_at_every_k_from_n_samples_by_hand():
    """Two questions, n = 4 samples each, 1 and 3 right. Written down: pass@1 = c/n averaged
    (1/4 + 3/4)/2 = 0.5; pass@2 = 1 − C(n−c, 2)/C(4, 2): (1 − 3/6 + 1 − 0/6)/2 = 0.75;
    pass@3: (1 − 1/4 + 1)/2 = 0.875; pass@4 = 1 (each question has a right answer)."""
    from nftune.evaluate import grade_items
    from nftune.verify import Verifier

    questions = [Question("a", "1+1", "2", "t"), Question("b", "2+2", "4", "t")]
    responses = [["Answer: 2", "Answer: 3", "Answer: 5", "Answer: 7"],
                 ["Answer: 4", "Answer: 4", "Answer: 1", "Answer: 4"]]
    with Verifier(workers=0) as verifier:
        result = grade_items("t", questions, responses, verifier)
    assert result.pass_at == pytest.approx({1: 0.5, 2: 0.75, 3: 0.875, 4: 1.0})
    assert result.avg_at_k == pytest.approx(result.pass_at[1])
    assert result.pass_at_k == pytest.approx(1.0)


def test_greedy_is_one_answer_said_not_silently_forced(tiny_base, arithmetic_files):
    from nftune.config import build_config
    from nftune.evaluate import benchmark_k, evaluate_questions
    from nftune.policy import load_policy
    from nftune.verify import Verifier

    model, tokenizer = load_policy(str(tiny_base), torch.device("cpu"))
    with Verifier(workers=0) as verifier, pytest.raises(ValueError, match="greedy"):
        evaluate_questions(model, tokenizer, [Question("a", "1+1", "2", "t")], k=4,
                           temperature=0.0, verifier=verifier)
    with pytest.warns(UserWarning, match="1 answer per question, not the protocol's 32"):
        assert benchmark_k("aime24", None, temperature=0.0) == 1
    assert benchmark_k("aime24", None, temperature=1.0) == 32
    assert benchmark_k("aime24", 4, temperature=1.0) == 4
    with pytest.raises(ValueError, match="eval_k: greedy evaluation"):
        build_config(None, {"eval_k": 4, "eval_temperature": 0.0})


def test_progress_bar_drives_whole_batches_and_keeps_the_answers(tiny_base, arithmetic_files):
    """With the bar, the Hugging Face engine is driven a whole number of its batches at a time
    (here 4 prompts × 2 answers per call of 8): the same seed gives the same answers."""
    from nftune.data import load_questions
    from nftune.evaluate import evaluate_questions
    from nftune.rollout import HFEngine
    from nftune.verify import Verifier

    questions = load_questions(str(arithmetic_files["test"])).questions
    engine = HFEngine.for_evaluation(str(tiny_base), device="cpu", batch_size=8)
    texts = {}
    with Verifier(workers=0) as verifier:
        for progress in (False, True):
            torch.manual_seed(0)
            result = evaluate_questions(engine.model, engine.tokenizer, questions, k=2,
                                        temperature=1.0, template="raw", max_new_tokens=24,
                                        verifier=verifier, engine=engine, progress=progress)
            texts[progress] = [r for item in result.items for r in item["responses"]]
    assert len(texts[True]) == 32 and texts[True] == texts[False]


def test_hf_evaluation_dtype(tiny_base):
    from nftune.rollout import HFEngine

    assert HFEngine.for_evaluation(str(tiny_base), device="cpu").model.dtype == torch.float32
    bf16 = HFEngine.for_evaluation(str(tiny_base), device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        HFEngine.for_evaluation(str(tiny_base), device="cpu", dtype="float16")


def test_last_curve_point_equals_nftune_eval_of_the_final_model(arithmetic_files, tmp_path):
    """In-training evaluation and `nftune eval` are one code path: greedy, on the same
    questions with the run's template, the last step's logged accuracy is what `nftune eval`
    reports for final/ (the same weights)."""
    from helpers import tiny_run_config

    from nftune.tasks.arithmetic import make_questions
    from nftune.tasks.base_model import SHIPPED_DIR
    from nftune.train import train

    # the demo's shipped base (84.6% greedy on its held-out split) and 16 of those questions
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(q.__dict__) + "\n"
                            for q in make_questions(16, "test", 0, 2)))
    arithmetic_files = {**arithmetic_files, "test": test}
    out = tmp_path / "run"
    cfg = tiny_run_config(SHIPPED_DIR, arithmetic_files, out, steps=2, eval_every=2,
                          eval_data=str(test), eval_temperature=0.0, eval_k=1,
                          max_new_tokens=48, lr=1e-4)
    final = train(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    curve = rows[-1]["eval/test/avg@1"]
    done = eval_cli("--model", str(final), "--benchmarks", str(arithmetic_files["test"]),
                    "--template", cfg.template, "--temperature", "0", "--samples", "1",
                    "--max-new-tokens", str(cfg.max_new_tokens), "--output",
                    str(tmp_path / "eval"), "--verify-workers", "1", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    reported = json.loads((tmp_path / "eval.json").read_text())["summary"]["test"]["avg_at_k"]
    assert 0 < curve < 1  # a number that can differ
    assert reported == curve
    # the run's own settings from its config.yaml: template, answer budget, final/ beside it
    done = eval_cli("--config", str(out / "config.yaml"), "--benchmarks", str(test),
                    "--temperature", "0", "--samples", "1", "--output", str(tmp_path / "run"),
                    "--verify-workers", "1", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["summary"]["test"]["avg_at_k"] == curve
    assert result["settings"]["template"] == cfg.template
    assert result["settings"]["max_new_tokens"] == cfg.max_new_tokens == 48


def test_a_training_set_is_evaluated_as_the_run_prompts_it(tiny_base, arithmetic_files,
                                                            tmp_path):
    """With --config, a set is cleaned as training cleans it: DAPO-Math's own instruction is
    stripped before the run's template adds it (without, it would be there twice)."""
    from nftune.config import build_config
    from nftune.data import DAPO_PREFIX, DAPO_SUFFIX, load_questions

    rows = [json.loads(x) for x in arithmetic_files["test"].read_text().splitlines()][:3]
    dapo_like = tmp_path / "dapo_like.jsonl"
    dapo_like.write_text("".join(json.dumps({**r, "problem": DAPO_PREFIX + r["problem"]
                                             + DAPO_SUFFIX}) + "\n" for r in rows))
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    build_config(None, {"model": str(tiny_base), "train_data": str(dapo_like),
                        "template": "dapo", "max_new_tokens": 12}).save(config)
    for flags, stem in ((["--config", str(config), "--model", str(tiny_base)], "as-run"),
                        (["--model", str(tiny_base), "--template", "dapo"], "as-published")):
        done = eval_cli(*flags, "--benchmarks", str(dapo_like), "--samples", "1",
                        "--temperature", "0", "--output", str(tmp_path / stem),
                        "--verify-workers", "1", "--no-progress")
        assert done.returncode == 0, done.stderr[-2000:]
    as_run = json.loads((tmp_path / "as-run.json").read_text())
    published = json.loads((tmp_path / "as-published.json").read_text())
    cleaned = [q.problem for q in load_questions(str(dapo_like))]  # training's loader
    assert [i["problem"] for i in as_run["items"]["dapo_like"]] == cleaned
    assert all(i["problem"].startswith(DAPO_PREFIX) for i in published["items"]["dapo_like"])
    assert as_run["settings"]["max_new_tokens"] == 12  # the run's budget, not 4,096
    assert published["settings"]["max_new_tokens"] == 4096
    assert any("--config" in o for o in as_run["settings"]["overrides"])


def test_paper_protocol_temperature_follows_the_model_size(tiny_base, tmp_path):
    """The paper samples its 7B models at 1.0 and its 32B model at 0.6: decided from the
    config's parameter count (meta device, no weights)."""
    from transformers import Qwen2Config

    from nftune.evaluate import model_parameters, paper_temperature

    assert paper_temperature(str(tiny_base)) == 1.0
    big = tmp_path / "qwen2.5-32b-shape"
    Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                tie_word_embeddings=False).save_pretrained(big)
    assert 32e9 < model_parameters(str(big)) < 33.5e9  # Qwen2.5-32B: 32.8 B
    assert paper_temperature(str(big)) == 0.6
    # no readable config: the 7B setting, and loading the model is what reports the problem
    assert model_parameters(str(tmp_path / "missing")) is None
    assert paper_temperature(str(tmp_path / "missing")) == 1.0


def test_vllm_memory_share_is_refused_with_the_hf_engine(tiny_base):
    """--gpu-memory-utilization is vLLM's share of the card: with the hf engine it is an
    error naming the flag, before any model loads."""
    from nftune.evaluate import evaluate_model

    with pytest.raises(ValueError, match="--gpu-memory-utilization: .* only with --engine vllm"):
        evaluate_model(str(tiny_base), ["math500"], None, engine_name="hf",
                       gpu_memory_utilization=0.5)

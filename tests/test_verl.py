"""nftune inside verl: plugin registration, loss equivalence through verl's own worker loss,
and data verl's dataset class loads. Runs on CPU with verl installed (the test extra).

What these tests are for: the *plumbing* — that verl finds the plugin, decodes our outcome
encoding, aggregates across ranks and micro-batches as nftune does, and that the recipe is a
valid verl config. They compare the plugin with ``compute_loss``, which shares
``nft_token_loss``, so they cannot catch a bug in NFT's maths: tests/test_objectives.py does
(by hand and from the paper's propositions). CI sets NFTUNE_REQUIRE_VERL=1, so a missing verl
fails there instead of skipping."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nftune.objectives import compute_loss

if os.environ.get("NFTUNE_REQUIRE_VERL"):
    import verl  # noqa: F401 — CI installs the test extra: a missing verl is a failure
else:
    verl = pytest.importorskip("verl", reason="the test extra installs verl")


def registries_in_fresh_process(plugins: str) -> dict:
    code = ("import json, verl\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as P, "
            "ADV_ESTIMATOR_REGISTRY as A\n"
            "print(json.dumps({'losses': {k: v.__module__ for k, v in P.items()}, "
            "'estimators': {k: v.__module__ for k, v in A.items()}}))")
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": plugins}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_verl_registers_nft_and_rft_through_the_entry_point():
    found = registries_in_fresh_process("auto")
    assert found["losses"]["nft"] == "nftune.integrations.verl"
    assert found["losses"]["rft"] == "nftune.integrations.verl"
    assert found["estimators"]["nft"] == "nftune.integrations.verl"
    # and it is the entry point that does it: with plugins off, nothing of ours is there
    off = registries_in_fresh_process("none")
    assert "nft" not in off["losses"] and "rft" not in off["losses"]
    assert "vanilla" in off["losses"]


# ---------------------------------------------------------------------------------------------
# Loss equivalence: verl's worker loss (ppo_loss → our registered loss → agg_loss) over ranks and
# micro-batches against nftune's compute_loss on the whole mini-batch
# ---------------------------------------------------------------------------------------------


def make_batch(seed: int, questions: int = 5, k: int = 4, prompt_width: int = 5,
               response_width: int = 7):
    g = torch.Generator().manual_seed(seed)
    b = questions * k
    prompt_lens = torch.randint(2, prompt_width + 1, (b,), generator=g)
    resp_lens = torch.randint(1, response_width + 1, (b,), generator=g)
    cols_p = torch.arange(prompt_width)[None, :]
    cols_r = torch.arange(response_width)[None, :]
    prompt_mask = (cols_p >= prompt_width - prompt_lens[:, None]).long()  # left-padded
    response_mask = (cols_r < resp_lens[:, None]).long()
    # outcome rewards in verl's layout: the score on the last response token, ±1 like
    # verl's math_dapo scorer; question 0 all right and question 1 all wrong (no signal)
    right = torch.rand(b, generator=g) < 0.5
    right[:k] = True
    right[k:2 * k] = False
    rewards = torch.zeros(b, response_width, dtype=torch.float64)
    rewards[torch.arange(b), resp_lens - 1] = torch.where(right, 1.0, -1.0).double()
    old = -torch.rand(b, response_width, generator=g, dtype=torch.float64) * 3
    new = (old + 0.3 * torch.randn(b, response_width, generator=g, dtype=torch.float64))
    return dict(prompt_mask=prompt_mask, response_mask=response_mask, rewards=rewards,
                old=old, new=new, uid=[f"q{i // k}" for i in range(b)], right=right, k=k)


def by_hand_outcome(batch):
    """r ∈ {0, 1} and each group's mean, computed without nftune."""
    right = batch["right"].tolist()
    uid = batch["uid"]
    r = torch.tensor([1.0 if x else 0.0 for x in right], dtype=torch.float64)
    means = {u: sum(r[i].item() for i in range(len(uid)) if uid[i] == u) /
             uid.count(u) for u in set(uid)}
    return r, torch.tensor([means[u] for u in uid], dtype=torch.float64)


def verl_worker_loss(config, batch, logprobs, rows, dp_size, batch_num_tokens, global_batch):
    """One micro-batch through verl's own worker loss, laid out as verl's FSDP engine does
    (log-probs flattened over prompt + response tokens, no padding)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    pm, rm = batch["prompt_mask"][rows], batch["response_mask"][rows]
    pieces = []
    for i, row in enumerate(rows.tolist()):
        p_len, r_len = int(pm[i].sum()), int(rm[i].sum())
        # position t of the flat sequence holds log π(token t+1): the response's j-th token
        # log-prob sits at p_len − 1 + j
        pieces += [torch.zeros(p_len - 1, dtype=logprobs.dtype), logprobs[row, :r_len],
                   torch.zeros(1, dtype=logprobs.dtype)]
    flat = torch.cat(pieces)
    data = TensorDict({
        "prompts": torch.ones_like(pm), "responses": torch.ones_like(rm),
        "attention_mask": torch.cat([pm, rm], 1), "response_mask": rm,
        "old_log_probs": batch["old"][rows], "advantages": batch["advantages"][rows],
    }, batch_size=[len(rows)])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                         global_batch_size=global_batch)
    loss, _ = ppo_loss(config, {"log_probs": flat}, data)
    return loss


def actor_config(loss_mode: str, weight: str | None, eps: float):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    # the same Hydra path as `actor_rollout_ref.actor.policy_loss._target_=...`
    return omega_conf_to_dataclass(OmegaConf.create({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 4,
        "use_dynamic_bsz": True, "loss_agg_mode": "token-mean",
        "policy_loss": {"_target_": "nftune.integrations.verl.NFTPolicyLossConfig",
                        "loss_mode": loss_mode, "nft_eps": eps,
                        f"{loss_mode}_weight": weight}}))


CASES = [("nft", w, e) for w in ("one", "dr_grpo", "grpo") for e in (0.01, 0.5, 1.0)] + \
        [("rft", w, 1.0) for w in ("one", "dr_grpo", "grpo")]


@pytest.mark.parametrize("loss_mode,weight,eps", CASES)
def test_verl_loss_matches_compute_loss_across_ranks_and_micro_batches(loss_mode, weight, eps):
    import numpy as np
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    batch = make_batch(seed=CASES.index((loss_mode, weight, eps)))
    mask = batch["response_mask"]
    estimator = get_adv_estimator_fn("nft")
    batch["advantages"], _ = estimator(token_level_rewards=batch["rewards"],
                                       response_mask=mask, index=np.array(batch["uid"]),
                                       config=None)
    # reference: nftune's compute_loss on the whole mini-batch, token-mean over it
    r, r_hat = by_hand_outcome(batch)
    ref_lp = batch["new"].clone().requires_grad_(True)
    hparams = {"weight": weight, **({"eps": eps} if loss_mode == "nft" else {})}
    ref_loss, _ = compute_loss(loss_mode, ref_lp, batch["old"], mask.double(), r, r_hat,
                               num_tokens=mask.sum(), **hparams)
    ref_loss.backward()

    # verl: 3 data-parallel ranks (uneven), each accumulating over its micro-batches; the
    # all-reduce averages the ranks' gradients
    config = actor_config(loss_mode, weight, eps)
    lp = batch["new"].clone().requires_grad_(True)
    rows = torch.randperm(len(mask), generator=torch.Generator().manual_seed(1))
    ranks = [rows[:6], rows[6:13], rows[13:]]
    total = torch.zeros((), dtype=torch.float64)
    for rank_rows in ranks:
        for micro in rank_rows.tensor_split(3):
            total = total + verl_worker_loss(config, batch, lp, micro, dp_size=len(ranks),
                                             batch_num_tokens=int(mask.sum()),
                                             global_batch=len(mask))
    total = total / len(ranks)
    total.backward()
    assert ref_lp.grad.abs().max().item() > 1e-3  # a real signal, not 0 == 0
    assert abs(total.item() - ref_loss.item()) < 1e-6
    assert torch.allclose(lp.grad, ref_lp.grad, atol=1e-6, rtol=0)
    # the uninformative groups (all right, all wrong) get exactly no gradient
    assert lp.grad[: 2 * batch["k"]].abs().max().item() == 0.0


def test_advantage_encoding_by_hand():
    import numpy as np

    from nftune.integrations.verl import compute_nft_outcome, decode_outcome

    # two questions × 3 answers; 0/1 rewards on the last token
    rewards = torch.zeros(6, 4)
    rewards[0, 3] = rewards[1, 1] = rewards[5, 2] = 1.0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
                         [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    adv, returns = compute_nft_outcome(rewards, mask, index=np.array(["a"] * 3 + ["b"] * 3))
    # r̂_a = 2/3, r̂_b = 1/3; A = (2r − 1)(1 + r̂)
    expected = torch.tensor([5 / 3, 5 / 3, -5 / 3, -4 / 3, -4 / 3, 4 / 3])
    assert torch.allclose(adv, expected[:, None] * mask, atol=1e-6)
    assert torch.equal(adv, returns)
    correct, r_hat = decode_outcome(adv, mask)
    assert correct.tolist() == [1, 1, 0, 0, 0, 1]
    assert torch.allclose(r_hat, torch.tensor([2 / 3] * 3 + [1 / 3] * 3), atol=1e-6)


def test_other_estimators_advantages_are_refused_with_a_clear_error():
    from nftune.integrations.verl import nft_policy_loss

    mask = torch.ones(2, 3)
    grpo_like = torch.tensor([[0.7] * 3, [-0.7] * 3])  # a GRPO advantage, not our encoding
    with pytest.raises(ValueError, match="adv_estimator=nft"):
        nft_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), grpo_like, mask)


# ---------------------------------------------------------------------------------------------
# Data and reward
# ---------------------------------------------------------------------------------------------


def test_verl_data_loads_in_verls_dataset_class(arithmetic_files, tmp_path):
    from omegaconf import OmegaConf
    from transformers import PreTrainedTokenizerFast
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from nftune.cli import main
    from nftune.tasks.tiny_model import char_tokenizer

    out = tmp_path / "verl"
    assert main(["verl-data", "--train", str(arithmetic_files["train"]), "--val",
                 str(arithmetic_files["test"]), "--template", "raw",
                 "--output-dir", str(out)]) == 0
    tok_dir = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rows = [json.loads(x) for x in arithmetic_files["train"].read_text().splitlines()]
    dataset = RLHFDataset(data_files=[str(out / "train.parquet")], tokenizer=tokenizer,
                          config=OmegaConf.create({"max_prompt_length": 512,
                                                   "filter_overlong_prompts": True,
                                                   "cache_dir": str(tmp_path / "cache")}))
    assert len(dataset) == len(rows)
    item = dataset[3]
    assert item["raw_prompt"] == [{"role": "user", "content": rows[3]["problem"]}]
    assert item["reward_model"] == {"style": "rule", "ground_truth": rows[3]["answer"]}
    assert item["extra_info"]["strategy"] == "auto"  # the raw template's
    assert item["data_source"] == "train"
    val = RLHFDataset(data_files=[str(out / "val.parquet")], tokenizer=tokenizer,
                      config=OmegaConf.create({"filter_overlong_prompts": False,
                                               "cache_dir": str(tmp_path / "cache")}))
    assert len(val) == 16


def test_reward_is_nftunes_verifier():
    from nftune.integrations.verl import compute_score

    info = {"strategy": "answer_line"}
    assert compute_score("dapo17k", "so 2 + 2\nAnswer: 4", "4", info) == {
        "score": 1.0, "acc": True, "truncated": False}
    assert compute_score("dapo17k", "Answer: 5", "4", info)["score"] == 0.0
    # math-verify for non-literal equality, in a worker process
    assert compute_score("math500", r"so \boxed{\frac{1}{2}}", "0.5",
                         {"strategy": "boxed"})["acc"] is True


# ---------------------------------------------------------------------------------------------
# The example recipe composes and validates against verl's own config
# ---------------------------------------------------------------------------------------------


def test_example_recipe_is_a_valid_verl_config(monkeypatch, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.utils.import_utils import load_extern_object

    from nftune.integrations import verl as plugin

    monkeypatch.setenv("NFTUNE_VERL_DATA", str(tmp_path))
    examples = Path(__file__).resolve().parents[1] / "examples" / "verl"
    with initialize_config_dir(config_dir=str(examples), version_base=None):
        cfg = compose(config_name="nft_qwen2.5_math_7b", overrides=["trainer.nnodes=4"])
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg),
                    use_critic=need_critic(cfg))
    assert not need_reference_policy(cfg) and not need_critic(cfg)  # no KL, no critic
    # the paper's 7B settings
    actor = cfg.actor_rollout_ref.actor
    assert cfg.data.train_batch_size == 512 and cfg.actor_rollout_ref.rollout.n == 16
    assert cfg.data.train_batch_size // actor.ppo_mini_batch_size == 16
    assert actor.optim.lr == 1e-6 and actor.optim.lr_warmup_steps > 0
    assert not actor.use_kl_loss and not cfg.algorithm.use_kl_in_reward
    assert actor.entropy_coeff == 0 and cfg.data.max_response_length == 3584
    assert cfg.data.train_files == f"{tmp_path}/train.parquet"
    # what verl's workers and driver will instantiate and look up
    actor_cfg = omega_conf_to_dataclass(actor)
    assert isinstance(actor_cfg.policy_loss, plugin.NFTPolicyLossConfig)
    assert (actor_cfg.policy_loss.nft_eps, actor_cfg.policy_loss.nft_weight) == (1.0, "dr_grpo")
    assert get_policy_loss_fn(actor_cfg.policy_loss.loss_mode) is plugin.nft_policy_loss
    assert plugin._hparams(actor_cfg, "nft") == ("dr_grpo", 1.0)
    # the documented switch to RFT trains the paper's RFT (ω = 1), not NFT's weight
    with initialize_config_dir(config_dir=str(examples), version_base=None):
        rft_cfg = compose(config_name="nft_qwen2.5_math_7b", overrides=[
            "actor_rollout_ref.actor.policy_loss.loss_mode=rft"])
    rft_actor = omega_conf_to_dataclass(rft_cfg.actor_rollout_ref.actor)
    assert get_policy_loss_fn(rft_actor.policy_loss.loss_mode) is plugin.rft_policy_loss
    assert plugin._hparams(rft_actor, "rft") == ("one", 1.0)
    algo = omega_conf_to_dataclass(cfg.algorithm)
    assert get_adv_estimator_fn(algo.adv_estimator) is plugin.compute_nft_outcome
    assert algo.filter_groups.enable and algo.filter_groups.metric == "acc"
    reward = cfg.reward.custom_reward_function
    assert load_extern_object(reward.path, reward.name) is plugin.compute_score
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    from nftune.integrations.verl_reward import TruncationAwareRewardManager

    assert resolve_reward_manager_cls(cfg) is TruncationAwareRewardManager


# ---------------------------------------------------------------------------------------------
# The recipe as launched: lengths, prompt format, what verl's entry point imports
# ---------------------------------------------------------------------------------------------

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "verl"
# max_position_embeddings in Qwen/Qwen2.5-Math-7B's config.json (no hub here: written down)
CONTEXT = {"Qwen/Qwen2.5-Math-7B": 4096}
# Qwen2.5-Math's chat template puts this system prompt before a conversation that has none
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _recipe(tmp_path, monkeypatch, overrides=()):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("NFTUNE_VERL_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(EXAMPLES), version_base=None):
        return compose(config_name="nft_qwen2.5_math_7b", overrides=list(overrides))


def _verl_data_args() -> list[str]:
    """The `nftune verl-data` command of the recipe's launch script, as argv."""
    import re
    import shlex

    script = (EXAMPLES / "run_nft_qwen2.5_math_7b.sh").read_text()
    command = re.search(r"nftune verl-data([^\n]*)", re.sub(r"\\\n\s*", " ", script))
    return ["verl-data", *shlex.split(command.group(1))]


def test_recipe_prompt_and_answer_fit_the_models_context(tmp_path, monkeypatch):
    cfg = _recipe(tmp_path, monkeypatch)
    context = CONTEXT[cfg.actor_rollout_ref.model.path]
    assert cfg.data.max_prompt_length + cfg.data.max_response_length <= context
    assert cfg.data.filter_overlong_prompts  # a longer prompt is dropped, not cut or failed
    max_model_len = cfg.actor_rollout_ref.rollout.get("max_model_len")
    assert max_model_len is None or max_model_len <= context


def test_recipe_prompt_format_and_reward_agree(tmp_path, monkeypatch, arithmetic_files):
    """The row verl builds from the recipe's data, in Qwen2.5-Math's chat template: the user
    message and the default system prompt ask for the same format, and an answer written in it
    is graded right by the recipe's reward; one in the other format is not."""
    from nftune.cli import build_parser
    from nftune.data import load_questions
    from nftune.integrations.verl import compute_score
    from nftune.integrations.verl_data import verl_rows

    args = build_parser().parse_args(_verl_data_args())
    assert args.if_changed  # files made earlier with other options are written again
    question = load_questions(str(arithmetic_files["test"])).questions[0]
    for template in (args.template, args.val_template):
        row = verl_rows([question], template, "dapo17k", "train")[0]
        user = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1  # no own system
        asks_box = "\\boxed" in user
        assert asks_box == ("\\boxed" in QWEN_MATH_SYSTEM), user
        gold, info = row["reward_model"]["ground_truth"], row["extra_info"]
        assert compute_score("dapo17k", f"so it is \\boxed{{{gold}}}", gold, info)["acc"]
        assert not compute_score("dapo17k", f"so it is\nAnswer: {gold}", gold, info)["acc"]


def test_recipe_entry_point_imports_resolve(tmp_path, monkeypatch):
    """verl.trainer.main_ppo runs the v1 trainer by default, which imports TransferQueue and
    verl's rollout server modules: the install must bring them."""
    cfg = _recipe(tmp_path, monkeypatch)
    assert cfg.trainer.use_v1
    import transfer_queue  # noqa: F401
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ, get_trainer_cls

    assert get_trainer_cls(cfg.trainer.v1.trainer_mode).__name__.startswith("PPOTrainer")
    assert AgentLoopManagerTQ is not None


def test_recipe_checkpoints_resume_and_convert_as_docs_say(tmp_path, monkeypatch):
    """docs/scale.md's paths: checkpoints under checkpoints/<project>/<experiment>, resumed
    automatically, converted with verl's model merger."""
    from verl.model_merger.base_model_merger import parse_args

    cfg = _recipe(tmp_path, monkeypatch)
    assert cfg.trainer.default_local_dir == "checkpoints/nftune/nft-qwen2.5-math-7b"
    assert cfg.trainer.resume_mode == "auto" and cfg.trainer.save_freq > 0
    scale = (EXAMPLES.parents[1] / "docs" / "scale.md").read_text()
    assert "checkpoints/nftune/nft-qwen2.5-math-7b/global_step_" in scale
    import re
    import shlex
    merge = re.search(r"python3? -m verl\.model_merger (merge[^\n]*)",
                      re.sub(r"\\\n\s*", " ", scale))
    monkeypatch.setattr(sys, "argv", ["model_merger", *shlex.split(merge.group(1))])
    args = parse_args()
    assert args.backend == "fsdp" and args.local_dir.endswith("/actor")


# ---------------------------------------------------------------------------------------------
# The reward as verl calls it: verl's loader builds the recipe's reward manager, which calls
# compute_score on each answer's decoded text
# ---------------------------------------------------------------------------------------------


def test_recipes_reward_manager_scores_boxed_answer_lines_and_truncated_answers(
        tiny_base, tmp_path, monkeypatch):
    import numpy as np
    from verl.protocol import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    from nftune.policy import load_tokenizer

    budget = 24  # data.max_response_length: the rollout's response budget
    cfg = _recipe(tmp_path, monkeypatch, [f"actor_rollout_ref.model.path={tiny_base}",
                                          f"data.max_response_length={budget}"])
    tokenizer = load_tokenizer(str(tiny_base))
    manager = load_reward_manager(cfg, tokenizer)
    assert type(manager).__name__ == "TruncationAwareRewardManager"
    eos = tokenizer.eos_token_id

    def score(text: str, *, stop: bool, gold: str = "4") -> dict:
        prompt = tokenizer("2+2=", add_special_tokens=False)["input_ids"]
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if stop else [])
        assert len(response) <= budget
        padded = response + [tokenizer.pad_token_id] * (budget - len(response))
        data = DataProto.from_dict(
            tensors={"prompts": torch.tensor([prompt]), "responses": torch.tensor([padded]),
                     "attention_mask": torch.tensor([[1] * len(prompt) + [1] * len(response)
                                                     + [0] * (budget - len(response))])},
            non_tensors={"data_source": np.array(["dapo17k"], dtype=object),
                         "reward_model": np.array([{"ground_truth": gold}], dtype=object),
                         # verl-data's rows for the recipe: the boxed template's strategy
                         "extra_info": np.array([{"strategy": "boxed"}], dtype=object)})
        # on the manager's own event loop, as verl's RewardLoopWorker runs it
        return manager.loop.run_until_complete(manager.run_single(data))

    # a finished boxed answer is graded by nftune's verifier; an `Answer:` line is not what
    # the recipe's prompts ask for (the box), so it is wrong; a wrong box is wrong
    assert score("so \\boxed{4}", stop=True)["reward_score"] == 1.0
    assert score("so it is\nAnswer: 4", stop=True)["reward_score"] == 0.0
    assert score("so \\boxed{5}", stop=True)["reward_score"] == 0.0
    # the same right box in an answer that used the whole budget without a stop token: cut
    # off, so wrong (as in the paper and nftune train) — and one token shorter it is not cut
    filler = "a" * (budget - len("\\boxed{4}"))
    cut = score(filler + "\\boxed{4}", stop=False)
    assert cut["reward_score"] == 0.0 and cut["reward_extra_info"]["truncated"] is True
    assert cut["reward_extra_info"]["acc"] is False
    done = score(filler[1:] + "\\boxed{4}", stop=True)
    assert done["reward_score"] == 1.0 and done["reward_extra_info"]["truncated"] is False
    # the keys verl stacks across a batch are the same for every answer
    assert set(cut["reward_extra_info"]) == set(done["reward_extra_info"])


# ---------------------------------------------------------------------------------------------
# Warm-up units, and the GPU smoke launch
# ---------------------------------------------------------------------------------------------


def test_recipe_warmup_is_stated_in_optimizer_steps_for_nftune_train(tmp_path, monkeypatch):
    """verl counts lr_warmup_steps in rollout steps (its worker steps the scheduler once per
    update_actor: tests/test_verl_actor.py measures it); nftune's warmup_steps counts optimizer
    steps. The docs give nftune's equivalent of the recipe, in its units."""
    import re

    from nftune.config import TrainConfig

    cfg = _recipe(tmp_path, monkeypatch)
    actor = cfg.actor_rollout_ref.actor
    per_rollout = cfg.data.train_batch_size // actor.ppo_mini_batch_size * actor.ppo_epochs
    in_optimizer_steps = actor.optim.lr_warmup_steps * per_rollout
    assert (actor.optim.lr_warmup_steps, per_rollout, in_optimizer_steps) == (10, 16, 160)
    scale = (EXAMPLES.parents[1] / "docs" / "scale.md").read_text()
    stated = {int(n) for n in re.findall(r"`warmup_steps: (\d+)`", scale)}
    assert stated == {in_optimizer_steps}
    help_text = TrainConfig.__dataclass_fields__["warmup_steps"].metadata["help"]
    assert "optimizer steps" in help_text and f"= {in_optimizer_steps}" in help_text


# a stand-in for the install's Python at the scripts' one boundary: it records each call's
# arguments and, as verl's entry point, prints what $STUB_SAYS and writes $STUB_WRITES
STUB_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 0; fi  # the scripts' import check
n=$(ls "$STUB_CALLS" | wc -l)
printf '%s\\n' "$PWD" "$PATH" "$@" > "$STUB_CALLS/$n"
if [ "$2" = "verl.trainer.main_ppo" ]; then
    printf '%s\\n' "$STUB_SAYS"
    if [ -n "$STUB_WRITES" ]; then mkdir -p "$STUB_WRITES"; fi
fi
"""


def _launch(script: str, tmp_path, says: str = "", writes: str = "", python=None):
    """Run examples/verl/SCRIPT as a user would, its Python the stub (or ``python``); returns
    the finished process and each recorded call's argv (without the interpreter)."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    calls = tmp_path / "calls"
    shutil.rmtree(calls, ignore_errors=True)
    calls.mkdir()
    env = {**os.environ, "NFTUNE_PYTHON": str(python or stub), "STUB_CALLS": str(calls),
           "STUB_SAYS": says, "STUB_WRITES": writes}
    done = subprocess.run(["bash", str(EXAMPLES / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    recorded = [(calls / str(i)).read_text().splitlines()
                for i in range(len(list(calls.iterdir())))]
    return done, recorded


def _compose_as_launched(argv: list[str], tmp_path, monkeypatch):
    """verl's `main_ppo --config-path P --config-name N overrides...`, composed as Hydra would
    from exactly those arguments."""
    from hydra import compose, initialize_config_dir

    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    assert argv[2] == "--config-path" and argv[4] == "--config-name"
    monkeypatch.setenv("NFTUNE_VERL_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=argv[3], version_base=None):
        return compose(config_name=argv[5], overrides=argv[6:])


def test_smoke_launch_runs_the_recipe_validates_once_and_fails_without_metrics(
        tmp_path, monkeypatch):
    """examples/verl/smoke_2_steps.sh, run as written up to the Python it launches: the data
    command parses, verl gets the recipe with overrides that make a valid one-GPU, 2-step run
    validating after the last step; the run passes only with validation metrics and the
    step-2 checkpoint."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from nftune.cli import build_parser

    checkpoint = "checkpoints/nftune/nft-smoke-2-steps/global_step_2"
    # what verl's pprint prints: the metrics, wrapped over lines
    metrics = ("('Final validation metrics: {'\n "
               "\"'val-core/math500/reward/mean@1': 0.25}\")")
    done, calls = _launch("smoke_2_steps.sh", tmp_path, says=metrics, writes=checkpoint)
    assert done.returncode == 0 and "smoke: passed" in done.stdout, done.stderr
    (data_cwd, data_path, *data), (_, ppo_path, *ppo) = calls
    assert ppo_path.split(":")[0] == str(tmp_path / "bin")  # the install's Python first on PATH
    assert data[:2] == ["-m", "nftune"]
    build_parser().parse_args(data[2:])  # nftune's own parser takes the data command
    cfg = _compose_as_launched(ppo, tmp_path, monkeypatch)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg),
                    use_critic=need_critic(cfg))
    actor = cfg.actor_rollout_ref.actor
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-1.5B"
    assert cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes == 1
    assert cfg.trainer.total_training_steps == 2 and cfg.trainer.save_freq == 2
    # validation once, after the last step (verl validates at the last step when test_freq > 0)
    assert not cfg.trainer.val_before_train and 0 < cfg.trainer.test_freq <= 2
    assert cfg.data.train_batch_size // actor.ppo_mini_batch_size == 2
    assert actor.policy_loss.loss_mode == "nft" and cfg.algorithm.adv_estimator == "nft"
    assert cfg.algorithm.filter_groups.enable  # the recipe's dynamic sampling, unchanged
    # no metrics (validation off), or no checkpoint: the smoke run fails, saying which
    for where, says, writes, message in (
            ("off", "Final validation metrics: None", checkpoint, "no validation metrics"),
            ("unsaved", metrics, "", "no checkpoint")):
        (tmp_path / where).mkdir()
        done, _ = _launch("smoke_2_steps.sh", tmp_path / where, says=says, writes=writes)
        assert done.returncode == 1 and message in done.stderr, done.stderr


def test_launch_scripts_name_the_python_without_nftune_and_verl(tmp_path):
    """A Python without the install (the system's) stops the launch at once, saying how to
    install; no data is written, nothing launched."""
    for script in ("smoke_2_steps.sh", "run_nft_qwen2.5_math_7b.sh"):
        done, calls = _launch(script, tmp_path, python="/usr/bin/python3")
        assert done.returncode == 1 and calls == []
        assert "cannot import nftune and verl" in done.stderr and ".[verl]" in done.stderr


def test_full_recipe_launch_composes_for_several_nodes(tmp_path, monkeypatch):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    monkeypatch.setenv("NNODES", "4")
    done, calls = _launch("run_nft_qwen2.5_math_7b.sh", tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = _compose_as_launched(calls[1][2:], tmp_path, monkeypatch)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg),
                    use_critic=need_critic(cfg))
    assert cfg.trainer.nnodes == 4 and cfg.trainer.n_gpus_per_node == 8


def test_recipe_attention_is_what_the_verl_extra_installs():
    """verl's default attention (flash_attention_2) needs flash-attn, which the `verl` extra
    does not install: the recipe must choose one that runs without it, or the extra bring it."""
    from importlib.metadata import requires

    from omegaconf import OmegaConf

    recipe = OmegaConf.load(EXAMPLES / "nft_qwen2.5_math_7b.yaml").actor_rollout_ref.model
    attention = recipe.get("override_config", {}).get("attn_implementation",
                                                      "flash_attention_2")
    extra = [r for r in requires("nftune") if 'extra == "verl"' in r]
    assert extra  # the installed nftune's own metadata
    flash = attention.startswith("flash_attention") or recipe.use_remove_padding
    assert not flash or any("flash-attn" in d or "fsdp" in d for d in extra), (attention, extra)

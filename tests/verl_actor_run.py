"""One rank of verl 0.9.1's own actor worker on CPU, trained with nftune's plugin loss.

Run by tests/test_verl_actor.py as ``python verl_actor_run.py RANK WORLD PORT MODEL OUT LOSS``
in WORLD processes. It builds ``ActorRolloutRefWorker`` (role ``actor``) from the example
recipe's composed config with a tiny model, gives each rank its share of one batch of answers
(verl's dispatch: contiguous chunks), computes π_old with the worker's ``compute_log_prob``,
advantages with verl's driver-side ``compute_advantage`` (the recipe's ``nft`` estimator),
then calls ``update_actor`` twice (two rollout steps, two mini-batches each). Writes
``OUT/rank{R}.json`` (metrics, π_old, what ran) and ``OUT/rank{R}-step{S}.safetensors`` (the
full weights after each call).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import verl_cpu  # noqa: E402 — registers the CPU platform before verl picks one

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "verl"


def recipe_config(model_dir: str, loss_mode: str, batch: dict):
    """The example recipe, with only what a tiny CPU run must change overridden."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("NFTUNE_VERL_DATA", "unused")
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        f"data.train_batch_size={batch['questions']}",
        f"actor_rollout_ref.rollout.n={batch['k']}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch['questions'] // 2}",
        f"actor_rollout_ref.actor.optim.lr={batch['lr']}",
        # CPU: FSDP2 (FSDP1 needs CUDA parameters), float32 compute (verl's default bf16 would
        # not compare to float tolerance); attention is the recipe's own (sdpa, padded rows)
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        # several micro-batches per rank: the token budget is small on purpose
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={batch['micro_tokens']}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={batch['micro_tokens']}",
    ]
    with initialize_config_dir(config_dir=str(RECIPE), version_base=None):
        return compose(config_name="nft_qwen2.5_math_7b", overrides=overrides)


def main() -> None:
    rank, world, port = (int(x) for x in sys.argv[1:4])
    model_dir, out, loss_mode = sys.argv[4], Path(sys.argv[5]), sys.argv[6]
    verl_cpu.init_gloo(rank, world, port)
    verl_cpu.register_fsdp_engine_for_cpu()

    import numpy as np
    import torch
    from safetensors.torch import save_file
    from verl.protocol import DataProto
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.utils import tensordict_utils as tu
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import response_from_nested

    batch = json.loads((out / "batch.json").read_text())
    cfg = recipe_config(model_dir, loss_mode, batch)
    answers = batch["answers"]
    per_rank = len(answers) // world
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))  # verl's dispatch: chunks

    def as_tensordict(rows, **fields):
        items = []
        for i in rows:
            a = answers[i]
            prompt, response = torch.tensor(a["prompt"]), torch.tensor(a["response"])
            ids = torch.cat([prompt, response])
            item = {"prompts": prompt, "responses": response, "input_ids": ids,
                    "position_ids": torch.arange(len(ids)),
                    "response_mask": torch.ones(len(response), dtype=torch.int64),
                    "loss_mask": torch.ones(len(response), dtype=torch.int64)}
            items.append({**item, **{k: v[i] for k, v in fields.items()}})
        return list_of_dict_to_tensordict(items)

    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    module = worker.actor.engine.module

    def full_weights() -> dict:
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in module.named_parameters()}

    save_file(full_weights(), str(out / f"rank{rank}-step0.safetensors"))

    # π_old: the worker's own forward (the trainer's compute_log_prob), then moved off-policy
    # by a fixed perturbation so that the ratios are not all 1 (the loss is not trivially 0)
    data = as_tensordict(mine)
    tu.assign_non_tensor(data, calculate_entropy=True, compute_loss=False, temperature=1.0)
    logp = response_from_nested(worker.compute_log_prob(data)["log_probs"],
                                data["response_mask"])
    old = {i: (lp + torch.tensor(answers[i]["shift"])).tolist()
           for i, lp in zip(mine, logp.unbind(), strict=True)}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, old)
    old = {int(i): v for part in gathered for i, v in part.items()}

    # advantages: verl's driver-side computation on the whole batch, the recipe's estimator
    width = max(len(a["response"]) for a in answers)
    mask = torch.zeros(len(answers), width, dtype=torch.int64)
    rewards = torch.zeros(len(answers), width)
    for i, a in enumerate(answers):
        mask[i, : len(a["response"])] = 1
        rewards[i, len(a["response"]) - 1] = a["score"]
    proto = DataProto.from_dict(tensors={"response_mask": mask, "token_level_rewards": rewards},
                                non_tensors={"uid": np.array([a["uid"] for a in answers],
                                                             dtype=object)})
    proto = compute_advantage(proto, adv_estimator=cfg.algorithm.adv_estimator,
                              num_repeat=batch["k"], config=cfg.algorithm)
    advantages = proto.batch["advantages"]

    results = {"loss_fn_module": get_policy_loss_fn(loss_mode).__module__,
               "old_log_probs": {str(i): v for i, v in old.items()},
               "advantages": [advantages[i, : len(a["response"])].tolist()
                              for i, a in enumerate(answers)],
               "updates": []}
    nested_mask = as_tensordict(mine)["response_mask"]
    for step in (1, 2):
        data = as_tensordict(
            mine, old_log_probs={i: torch.tensor(old[i]) for i in mine},
            advantages={i: advantages[i, : len(answers[i]["response"])] for i in mine})
        assert data["advantages"].is_nested and nested_mask.is_nested
        # what the v1 trainer's _update_actor puts in the batch's extra info
        actor = cfg.actor_rollout_ref.actor
        mini = actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
        tu.assign_non_tensor(data, calculate_entropy=actor.entropy_coeff != 0,
                             distillation_use_topk=False, distillation_only=False,
                             global_batch_size=mini, mini_batch_size=mini,
                             epochs=actor.ppo_epochs, seed=actor.data_loader_seed,
                             dataloader_kwargs={"shuffle": actor.shuffle},
                             temperature=cfg.actor_rollout_ref.rollout.temperature)
        output = worker.update_actor(data)
        metrics = tu.get(output, "metrics")
        results["updates"].append({k: v for k, v in metrics.items()
                                   if isinstance(v, (int, float, list))})
        save_file(full_weights(), str(out / f"rank{rank}-step{step}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(results, default=float))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

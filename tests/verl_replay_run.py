"""verl 0.9.1's v1 replay buffer, built as its trainer builds it from the example recipe, fed
groups of answers the way verl's agent loop writes them to TransferQueue (local Ray, CPU).

Run by tests/test_verl_sampling.py as ``python verl_replay_run.py OUT``. Reads ``OUT/plan.json``
(the outcomes of every group the "rollout" will produce, in order, and the batch size), writes
``OUT/result.json``: the groups the buffer handed to the update with the outcomes read back
from TransferQueue, each refill request, and verl's filter metrics. Only generation is
stood in for (each group's answers are written with their reward, as verl's agent loop does
after scoring); the filtering, the refill arithmetic and the selection are verl's.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "verl"


def main() -> None:
    out = Path(sys.argv[1])
    plan = json.loads((out / "plan.json").read_text())
    import ray
    import torch

    # logical CPUs for Ray's scheduler: TransferQueue's controller and two storage units each
    # ask for one
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        import transfer_queue as tq
        from hydra import compose, initialize_config_dir
        from verl.trainer.ppo.v1 import get_trainer_cls
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        tq.init()
        os.environ.setdefault("NFTUNE_VERL_DATA", "unused")
        with initialize_config_dir(config_dir=str(RECIPE), version_base=None):
            cfg = compose(config_name="nft_qwen2.5_math_7b", overrides=[
                f"data.train_batch_size={plan['batch_size']}",
                f"actor_rollout_ref.rollout.n={len(plan['groups'][0])}"])
        trainer_cls = get_trainer_cls(cfg.trainer.v1.trainer_mode)
        produced: list[str] = []

        def generate(count: int) -> int:
            """The agent loop's writes for ``count`` new questions, already scored."""
            uids = [f"q{len(produced) + i}" for i in range(count)]
            outcomes = [plan["groups"][len(produced) + i] for i in range(count)]
            produced.extend(uids)
            tq.kv_batch_put(keys=uids, partition_id="train", tags=[
                {"is_prompt": True, "status": "pending", "global_steps": 1}] * count)
            keys, fields = [], []
            for uid, group in zip(uids, outcomes, strict=True):
                for session, right in enumerate(group):
                    keys.append(f"{uid}_{session}_0")
                    score = float(right)
                    fields.append({"rm_scores": torch.tensor([0.0, score]), "extra_fields": {
                        "reward_extra_info": {"score": score, "acc": bool(right),
                                              "truncated": False}}})
            tq.kv_batch_put(keys=keys, partition_id="train",
                            fields=list_of_dict_to_tensordict(fields),
                            tags=[{"status": "success", "global_steps": 1}] * len(keys))
            tq.kv_batch_put(keys=uids, partition_id="train",
                            tags=[{"status": "finished"}] * count)
            return count

        refills: list[int] = []

        def refill(count: int) -> int:
            refills.append(count)
            return generate(count)

        # the trainer's own construction (trainer_base._build_replay_buffer) on a stand-in
        # holding what it reads: the config, the mode and the refill hook
        trainer = SimpleNamespace(config=cfg, trainer_mode=cfg.trainer.v1.trainer_mode,
                                  _add_prompts_to_generate=refill)
        trainer._resolve_filter_groups_metric = (
            lambda: trainer_cls._resolve_filter_groups_metric(trainer))
        buffer = trainer_cls._build_replay_buffer(trainer)
        buffer.poll_interval = 0.05
        generate(plan["batch_size"])  # the step's first batch (prepare_step)
        batch, metrics = buffer.sample(global_steps=1, partition_id="train",
                                       batch_size=plan["batch_size"])
        data = tq.kv_batch_get(keys=batch.keys, partition_id="train",
                               select_fields=["extra_fields"])
        outcomes: dict[str, list[bool]] = {}
        for key, extra in zip(batch.keys, data["extra_fields"], strict=True):
            info = getattr(extra, "data", extra)["reward_extra_info"]
            outcomes.setdefault(key.split("_")[0], []).append(bool(info["acc"]))
        result = {"replay_buffer": type(buffer).__module__ + "." + type(buffer).__name__,
                  "filter_metric": buffer.filter_groups_metric, "batch": outcomes,
                  "produced": produced, "refills": refills,
                  "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")}}
        (out / "result.json").write_text(json.dumps(result))
        tq.close()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

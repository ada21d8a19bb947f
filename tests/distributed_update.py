"""Worker for tests/test_distributed.py: one fixed global batch, updated by one process or by
each rank of ``torchrun --nproc-per-node N`` (gloo) on its share of the questions.

    python tests/distributed_update.py MODEL TRAIN_JSONL OUT_DIR ALGO MINIBATCHES STEPS STRATEGY
        [LORA_RANK]

Every rank builds the same global batch (same model, seed and questions; a verifier on one
process), keeps its questions as the trainer deals them (global number mod N), and takes
STEPS rollout updates with ``update_policy``, under STRATEGY (ddp, or fsdp for one step: the
batch is sampled by one process before the model is sharded); each rank writes
OUT_DIR/rank-R.json: the metrics of every update and checksums of the weights after it (under
fsdp the weights gathered on rank 0), and the evaluation split across the ranks. One process
writes OUT_DIR/single.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from nftune.config import build_config
from nftune.data import PromptSampler, load_questions, strategy_for
from nftune.evaluate import evaluate_sets
from nftune.parallel import close_world, init_world
from nftune.policy import build_policy, make_optimizer, make_scheduler
from nftune.rollout import HFEngine
from nftune.train import collect_rollout
from nftune.update import data_parallel, full_policy, update_policy
from nftune.verify import Verifier


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    model_dir, train_file, out, algo, minibatches, steps, strategy = sys.argv[1:8]
    lora_rank = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    torch.set_num_threads(1)
    cfg = build_config(None, dict(
        model=model_dir, train_data=train_file,
        template="raw", algo=algo, prompts_per_step=6, answers_per_prompt=4,
        max_new_tokens=24, lr=1e-3, warmup_steps=0, minibatches=int(minibatches),
        micro_batch_tokens=64, device="cpu", output_dir=out,
        distributed_strategy=strategy, lora_rank=lora_rank)).resolve()
    world = init_world("cpu", 30)
    device = torch.device("cpu")
    torch.manual_seed(0)  # LoRA's A: the same in one process and on every rank
    model, tokenizer = build_policy(cfg, device)
    questions = load_questions(train_file).questions
    forward = optimizer = scheduler = None
    sampler = PromptSampler(len(questions), cfg.seed)
    rows = []
    with Verifier(1, 5.0, strategy=strategy_for(cfg.template)) as verifier:
        for step in range(int(steps)):
            # the same global batch on every rank: one process's rollout, seeded by the step
            torch.manual_seed(1000 + step)
            batch, _ = collect_rollout(model, tokenizer, questions, sampler, verifier, cfg)
            assert batch is not None, "the tiny base kept no question"
            if forward is None:  # sharded after the first rollout (fsdp: one step)
                forward = data_parallel(model, world, strategy)
                optimizer = make_optimizer(model, cfg)
                scheduler = make_scheduler(optimizer, cfg)
            else:
                assert strategy == "ddp", "fsdp: one step only"
            groups = int(batch.group_ids.max()) + 1
            # the trainer's layout: questions dealt to the ranks in turn
            mine = torch.nonzero(batch.group_ids % world.size == world.rank).flatten()
            local = batch.select(mine) if len(mine) else None
            metrics, _ = update_policy(model, optimizer, scheduler, local, cfg, 0, world,
                                       forward)
            whole = full_policy(forward, model, world)
            rows.append({"metrics": metrics, "groups": groups, "local_answers": len(mine),
                         "weights": weights_digest(whole) if whole is not None else None,
                         "weight_sum": sum(t.double().abs().sum().item() for t in
                                           whole.state_dict().values()) if whole else None})
        # held-out metrics: each rank answers its share of 21 questions (greedy)
        engine = HFEngine(model, tokenizer, 10)  # 11 and 10 questions: 2 calls and 1
        if strategy == "fsdp" and world.distributed:
            engine.shard_with(forward, world)
        evaluation = evaluate_sets(engine, tokenizer, {"held": questions[:21]}, verifier, cfg,
                                   world)
    Path(out).mkdir(parents=True, exist_ok=True)
    name = f"rank-{world.rank}.json" if world.distributed else "single.json"
    Path(out, name).write_text(json.dumps({"rows": rows, "eval": evaluation}))
    close_world(world)


if __name__ == "__main__":
    main()

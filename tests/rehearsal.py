"""A stranger's model and data, built in the tests: a Qwen2-architecture model with a byte-level
BPE tokenizer trained here with the ``tokenizers`` library (``<|im_start|>``/``<|im_end|>``
chat markup, a chat template with a default system prompt, two EOS ids in its generation
config), saved in bfloat16 as real Qwen checkpoints are, taught level-1 arithmetic in its chat
format; and question files in the hub's column layouts (DAPO-Math-17k's for training,
MATH-500's for evaluation). Used by tests/test_rehearsal.py and the vLLM environment's test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SYSTEM = "You add and subtract. Show the sum, then a line Answer: N."
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM
    + "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on ``corpus`` (GPT-2 / Qwen style: every byte is a
    token, merges learned on top), wrapped for transformers with Qwen's special tokens (saved
    as ``TokenizersBackend``: ``Qwen2Tokenizer`` would re-split text its own way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # digits one by one, as Qwen's and Llama's tokenizers split them
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def stranger_model(path: Path, sft_steps: int = 400, seed: int = 0) -> Path:
    """Build, teach and save the model directory (bfloat16, as its config declares)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from nftune.data import DAPO_PREFIX, DAPO_SUFFIX, format_prompt
    from nftune.tasks.arithmetic import make_problems

    rng = random.Random(seed)
    torch.manual_seed(seed)
    problems = make_problems(600, "train", seed, 1)
    corpus = [DAPO_PREFIX + DAPO_SUFFIX, SYSTEM] + [
        f"{p.text}\n{p.solution(rng, 0.0)[0]}" for p in problems]
    tokenizer = bpe_tokenizer(corpus)
    end, text_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=end, pad_token_id=text_end)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(sft_steps):
        rows, targets = [], []
        for p in rng.sample(problems, 32):
            prompt = tokenizer(format_prompt(p.text, "chat:raw", tokenizer),
                               add_special_tokens=False)["input_ids"]
            answer = tokenizer("\n" + p.solution(rng, 0.2)[0],
                               add_special_tokens=False)["input_ids"] + [end]
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [text_end] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config = GenerationConfig(eos_token_id=[end, text_end],
                                               pad_token_id=text_end)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hub_layout_files(root: Path, train: int = 200, test: int = 24) -> dict[str, Path]:
    """Question files as the hub lays them out: DAPO-Math-17k's (parquet: prompt as chat
    messages wrapped in DAPO's instruction, reward_model.ground_truth, extra_info.index) and
    MATH-500's (JSON Lines: problem, solution, answer, subject, level, unique_id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nftune.data import DAPO_PREFIX, DAPO_SUFFIX
    from nftune.tasks.arithmetic import make_questions

    root.mkdir(parents=True, exist_ok=True)
    rows = [{"data_source": "math_dapo",
             "prompt": [{"content": DAPO_PREFIX + q.problem + DAPO_SUFFIX, "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": q.answer, "style": "rule"},
             "extra_info": {"index": f"{i:05d}"}}
            for i, q in enumerate(make_questions(train, "train", 0, 1))]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    bench = root / "bench"
    bench.mkdir(exist_ok=True)
    with (bench / "math500.jsonl").open("w") as f:
        for i, q in enumerate(make_questions(test, "test", 0, 1)):
            f.write(json.dumps({"problem": q.problem, "solution": f"\\boxed{{{q.answer}}}",
                                "answer": q.answer, "subject": "Arithmetic", "level": 1,
                                "unique_id": f"test/arithmetic/{i}.json"}) + "\n")
    return {"train": root / "train.parquet", "bench": bench}

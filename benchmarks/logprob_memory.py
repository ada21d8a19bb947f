"""Peak memory of recording old log-probs during generation: nftune's recorder against keeping
every step's logits (``output_logits=True``), at a real model's vocabulary size.

Usage: python benchmarks/logprob_memory.py [--vocab 151936] [--rows 64] [--new-tokens 256]

A randomly initialised one-layer Qwen2 with the given vocabulary samples ``--rows`` answers of
exactly ``--new-tokens`` tokens (no EOS), four ways, each in its own process: plain
``generate`` (the baseline), generate with :class:`nftune.rollout.LogprobRecorder`, generate
with ``output_logits=True`` followed by one log-softmax over the stacked logits (how nftune
did it before), and generate followed by a no-grad forward (``recompute``); then the update's
forward + backward over answers of that length, with nftune's ``token_logprobs`` (``update``)
and with a full log-softmax then a gather (``update_log_softmax``, the former formula). Prints each
process's peak RSS and its excess over plain generate, with the size the stored logits must
take (rows × new tokens × vocab × 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(method: str, vocab: int, rows: int, new_tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

    from nftune.rollout import LogprobRecorder
    from nftune.update import response_logprobs

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=new_tokens + 16, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    prompts = torch.randint(0, vocab, (rows, 8))
    sampling = dict(do_sample=True, top_k=0, max_new_tokens=new_tokens, eos_token_id=None,
                    pad_token_id=0, return_dict_in_generate=True)
    start = time.perf_counter()
    if method.startswith("update"):  # forward + backward over given answers, no generation
        ids = torch.cat([prompts, torch.randint(0, vocab, (rows, new_tokens))], 1)
        model.train()
        if method == "update":
            logprobs, _ = response_logprobs(model, ids, torch.ones_like(ids), 8)
        else:  # the former formula: a full (B, R, V) log-softmax, then the gather
            logits = model(input_ids=ids, logits_to_keep=new_tokens + 1).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1)
            logprobs = logp.gather(-1, ids[:, 8:, None]).squeeze(-1)
            del logits, logp
        logprobs.mean().backward()
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": time.perf_counter() - start, "columns": new_tokens}
    with torch.no_grad():
        if method == "recorder":
            recorder = LogprobRecorder()
            out = model.generate(prompts, logits_processor=LogitsProcessorList([recorder]),
                                 **sampling)
            logprobs, _ = recorder.finish(out.sequences[:, 8:])
        elif method == "output_logits":
            out = model.generate(prompts, output_logits=True, **sampling)
            logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
            logprobs = logp.gather(-1, out.sequences[:, 8:, None]).squeeze(-1)
        else:
            out = model.generate(prompts, **sampling)
            if method == "recompute":
                ids = out.sequences
                logprobs, _ = response_logprobs(model, ids, torch.ones_like(ids), 8)
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "columns": out.sequences.shape[1] - 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2.5's
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run(args.worker, args.vocab, args.rows, args.new_tokens)))
        return
    print(f"vocab {args.vocab}, {args.rows} answers × {args.new_tokens} new tokens; stored "
          f"logits would take {args.rows * args.new_tokens * args.vocab * 4 / 2**20:,.0f} MB")
    base = None
    for method in ("plain", "recorder", "output_logits", "recompute", "update",
                   "update_log_softmax"):
        done = subprocess.run([sys.executable, __file__, "--worker", method, "--vocab",
                               str(args.vocab), "--rows", str(args.rows), "--new-tokens",
                               str(args.new_tokens)], capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"  {method:<19} failed (rc {done.returncode}): {done.stderr[-300:]}")
            continue
        r = json.loads(lines[-1][7:])
        base = r["peak_rss_mb"] if base is None else base
        print(f"  {method:<19} peak RSS {r['peak_rss_mb']:8,.0f} MB  "
              f"({r['peak_rss_mb'] - base:+7,.0f} MB over plain generate), "
              f"{r['seconds']:5.1f} s, {r['columns']} columns")


if __name__ == "__main__":
    main()

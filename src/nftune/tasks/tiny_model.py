"""A tiny Qwen2-architecture causal LM with a character-level tokenizer, built from scratch.

It takes the same transformers code path as real Qwen models, and its tokenizer is saved as a
``PreTrainedTokenizerFast`` (WordLevel over characters), which :func:`nftune.policy.load_policy`
loads as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_CHARS = "0123456789+-*/=()., :?\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ$\\{}"


def char_tokenizer(chars: str = DEFAULT_CHARS):
    """A character-level fast tokenizer: one token per character, plus pad/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK)


def tiny_qwen2(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 512,
               seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM sized for CPU experiments."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model_dir(model, tokenizer, path: str | Path) -> Path:
    """A normal HF model directory: config, safetensors weights, tokenizer files."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # name the class explicitly: AutoTokenizer would load a qwen2 directory's tokenizer as
    # the byte-level Qwen2Tokenizer, which drops this vocabulary's spaces
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2))
    return path

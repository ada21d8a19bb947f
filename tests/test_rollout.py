"""Rollout: old log-probs recorded during generation against a forward over each answer alone."""

import pytest
import torch

from nftune.data import format_prompt
from nftune.policy import load_policy
from nftune.rollout import generate_rollout
from nftune.tasks.arithmetic import make_questions
from nftune.update import recompute_logprobs


def sample(model, tokenizer, prompts, k, source, temperature=1.0, **kw):
    """A rollout with π_old's log-probs recorded at generation or by a forward afterwards."""
    rollout = generate_rollout(model, tokenizer, prompts, k, temperature=temperature,
                               record_logprobs=source == "generate", **kw)
    if source == "recompute":
        rollout.old_logprobs, rollout.entropy = recompute_logprobs(model, rollout, 16384,
                                                                   temperature)
    return rollout


@pytest.fixture(scope="module")
def policy(tiny_base):
    model, tokenizer = load_policy(str(tiny_base), torch.device("cpu"))
    model.eval()
    return model, tokenizer


def by_hand(model, tokenizer, prompt: str, response: list[int], temperature: float = 1.0
            ) -> tuple[torch.Tensor, ...]:
    """log π and entropy at each response token, from one unpadded forward over this answer;
    π = softmax(logits / temperature)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits[len(ids) - len(response) - 1:-1], -1)
    token_logp = logp[torch.arange(len(response)), torch.tensor(response)]
    return token_logp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_p=1.0, top_k=0),
                                      dict(temperature=0.7, top_p=0.9, top_k=5)])
def test_logprobs_from_generation_equal_a_forward_over_each_answer(policy, sampling):
    model, tokenizer = policy
    prompts = [format_prompt(q.problem, "raw") for q in make_questions(6, "test", 1, 1)]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, prompts, 3, max_new_tokens=40,
                               batch_size=8, record_logprobs=True, **sampling)
    lengths = rollout.response_lengths.tolist()
    assert len(set(lengths)) > 1  # uneven answers: rows padded after their EOS
    for row, n in enumerate(lengths):
        response = rollout.input_ids[row, rollout.prompt_len:rollout.prompt_len + n].tolist()
        logp, entropy = by_hand(model, tokenizer, prompts[row // 3], response,
                                sampling["temperature"])
        # π at the sampling temperature, over the full vocabulary (not top-k / top-p cut)
        torch.testing.assert_close(rollout.old_logprobs[row, :n].double(), logp,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout.entropy[row, :n].double(), entropy,
                                   atol=1e-5, rtol=0)
        assert not rollout.old_logprobs[row, n:].any() and not rollout.entropy[row, n:].any()


def test_both_sources_agree_and_a_repetition_penalty_is_not_applied(policy):
    model, tokenizer = policy
    prompts = [format_prompt(q.problem, "raw") for q in make_questions(4, "test", 1, 1)]
    runs = {}
    model.generation_config.repetition_penalty = 5.0  # as some hub configs ship
    try:
        for source in ("generate", "recompute"):
            torch.manual_seed(1)
            runs[source] = sample(model, tokenizer, prompts, 4, source, max_new_tokens=16)
    finally:
        model.generation_config.repetition_penalty = 1.0
    torch.manual_seed(1)
    plain = generate_rollout(model, tokenizer, prompts, 4, max_new_tokens=16)
    assert runs["generate"].texts == runs["recompute"].texts == plain.texts
    torch.testing.assert_close(runs["generate"].old_logprobs, runs["recompute"].old_logprobs,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(runs["generate"].entropy, runs["recompute"].entropy,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_elements", [2**25, 50])  # one chunk; a few rows per chunk
def test_token_logprobs_match_log_softmax_in_float64_with_gradients(monkeypatch,
                                                                    chunk_elements,
                                                                    temperature):
    from nftune import update as rollout

    monkeypatch.setattr(rollout, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4, 7, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 7, (5, 4))
    weights = torch.randn(5, 4, dtype=torch.float64)

    logp, entropy = rollout.token_logprobs(logits.float(), targets, with_entropy=True,
                                           temperature=temperature)
    (logp.double() * weights).sum().backward()

    x = logits.detach() / temperature
    softmax = x.exp() / x.exp().sum(-1, keepdim=True)
    expected = x.gather(-1, targets[..., None]).squeeze(-1) - x.exp().sum(-1).log()
    torch.testing.assert_close(logp.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(softmax * softmax.log()).sum(-1),
                               atol=1e-5, rtol=0)
    # d/dx_j of w·log softmax(x)_a = w·(1[j = a] − softmax(x)_j)
    onehot = torch.nn.functional.one_hot(targets, 7).double()
    # (and the chain rule through x / T multiplies by 1/T)
    torch.testing.assert_close(logits.grad, weights[..., None] * (onehot - softmax) / temperature,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_elements", [2**25, 200])  # one chunk; 2 tokens per chunk
@pytest.mark.parametrize("tied", [True, False])
def test_logprobs_from_hidden_states_equal_the_logits_path_in_float64(monkeypatch, tiny_base,
                                                                     chunk_elements, temperature,
                                                                     tied):
    """The LM head applied a chunk of tokens at a time (forward and recomputing backward)
    gives the same log-probs, entropy and gradient on every parameter as the plain path:
    logits of the whole batch, log-softmax, gather."""
    from nftune import update
    from nftune.update import logits_from_hidden_states, position_ids_for, response_logprobs

    monkeypatch.setattr(update, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    model, _ = load_policy(str(tiny_base), torch.device("cpu"))
    if not tied:  # an untied head: its own weight gets a gradient too
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    model = model.double().train()
    assert logits_from_hidden_states(model)
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (3, 12))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded row
    p = 5
    weights = torch.randn(3, 7, dtype=torch.float64)

    logp, entropy = response_logprobs(model, ids, attn, p, with_entropy=True,
                                      temperature=temperature)
    (logp.double() * weights).sum().backward()
    fast = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn,
                   position_ids=position_ids_for(attn)).logits[:, p - 1:-1] / temperature
    plain = torch.log_softmax(logits, -1)
    expected = plain.gather(-1, ids[:, p:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logp.double(), expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), -(plain.exp() * plain).sum(-1).detach(),
                               atol=1e-6, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, atol=1e-9, rtol=1e-7, msg=name)


def test_old_logprobs_are_those_of_the_sampling_temperature(policy):
    """At T = 0.6 the answers are drawn from softmax(logits / 0.6): recorded and recomputed
    old log-probs are of that distribution (checked against a plain forward), and the NFT loss
    of the unchanged model on its own rollout is 0 (π_θ = π_old)."""
    from nftune.objectives import compute_loss
    from nftune.update import position_ids_for, response_logprobs

    model, tokenizer = policy
    prompts = [format_prompt(q.problem, "raw") for q in make_questions(4, "test", 2, 1)]
    runs = {}
    for source in ("generate", "recompute"):
        torch.manual_seed(3)
        runs[source] = sample(model, tokenizer, prompts, 4, source, max_new_tokens=16,
                              temperature=0.6)
    recorded, recomputed = runs["generate"], runs["recompute"]
    assert recorded.texts == recomputed.texts
    # float rounding of the logits (1e-5 at T = 1) is scaled by 1/T
    torch.testing.assert_close(recorded.old_logprobs, recomputed.old_logprobs, atol=2e-5,
                               rtol=0)
    with torch.no_grad():  # the definition, by hand: log softmax(logits / T) at the token
        ids, attn, p = recorded.input_ids, recorded.attention_mask, recorded.prompt_len
        logits = model(input_ids=ids, attention_mask=attn,
                       position_ids=position_ids_for(attn)).logits[:, p - 1:-1].double()
        by_hand = torch.log_softmax(logits / 0.6, -1).gather(-1, ids[:, p:, None])[..., 0]
    mask = recorded.response_mask.bool()
    torch.testing.assert_close(recorded.old_logprobs[mask].double(), by_hand[mask], atol=2e-5,
                               rtol=0)
    logprobs, _ = response_logprobs(model, ids, attn, p, temperature=0.6)
    correct = torch.tensor([1.0, 0.0] * 8)
    loss, _ = compute_loss("nft", logprobs, recorded.old_logprobs, recorded.response_mask,
                           correct, torch.full((16,), 0.5), eps=1.0)
    assert abs(loss.item()) < 1e-5


def test_every_eos_the_generation_config_declares_ends_an_answer(tiny_base, tmp_path):
    """A chat-style model lists two EOS ids in its generation config while its tokenizer names
    another token: answers still end at the model's real EOS (not truncated), which is kept as
    the response's last token and left out of the text."""
    model, tokenizer = load_policy(str(tiny_base), torch.device("cpu"))
    real_eos = tokenizer.eos_token_id
    tokenizer.eos_token = "<unk>"
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, real_eos]
    prompts = [format_prompt(q.problem, "raw", tokenizer)
               for q in make_questions(16, "test", 0, 1)]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, prompts, 2, max_new_tokens=40, top_k=0)
    ended = ~rollout.truncated
    assert ended.float().mean().item() > 0.8
    last = rollout.input_ids[:, rollout.prompt_len:].gather(
        1, (rollout.response_lengths - 1)[:, None]).flatten()
    assert (last[ended] == real_eos).all()
    assert not any("<eos>" in t for t in rollout.texts)


def test_answers_end_at_the_first_stop_token_of_any_kind():
    """assemble_rollout by hand: stop ids 1 and 7; pad 0."""
    from nftune.rollout import assemble_rollout
    from nftune.tasks.tiny_model import char_tokenizer

    tokenizer = char_tokenizer()
    response = torch.tensor([[5, 7, 9, 1], [5, 5, 1, 7], [5, 5, 5, 5]])
    rollout = assemble_rollout(tokenizer, [[3], [3, 4], [4]], response, [1, 7], k=3)
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert rollout.truncated.tolist() == [False, False, True]
    assert rollout.input_ids[:, 2:].tolist() == [[5, 7, 0, 0], [5, 5, 1, 0], [5, 5, 5, 5]]
    assert rollout.attention_mask[:, :2].tolist() == [[0, 1], [1, 1], [0, 1]]
    assert rollout.group_ids.tolist() == [0, 0, 0]


def test_answers_are_cut_to_the_models_context():
    """A model with 40 positions and 30-token prompts: whatever max_new_tokens asks, an answer
    stops at 10 tokens (truncated there), with one warning; a prompt filling the context is an
    error that names it."""
    from nftune.tasks.tiny_model import char_tokenizer, tiny_qwen2

    tokenizer = char_tokenizer()
    model = tiny_qwen2(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_positions=40)
    model.generation_config.eos_token_id = None  # no end of answer: every answer runs out
    tokenizer.eos_token = None
    prompt = "1" * 30
    with pytest.warns(UserWarning, match="40 positions"):
        rollout = generate_rollout(model, tokenizer, [prompt], 3, max_new_tokens=64)
    assert rollout.input_ids.shape[1] <= 40
    assert rollout.response_lengths.tolist() == [10, 10, 10]
    assert rollout.truncated.all()
    with pytest.raises(ValueError, match="40-token prompt leaves no room"):
        generate_rollout(model, tokenizer, ["1" * 40], 1, max_new_tokens=5)


def _three_tokenizers():
    """The three BOS conventions, built here: Llama-style (declares <s> and its post-processor
    adds it), GPT-2-style (declares <s>, never adds it), Qwen-style (no BOS); each with a chat
    template that writes <s> where the tokenizer has one."""
    from tokenizers import processors

    from nftune.tasks.tiny_model import char_tokenizer

    qwen = char_tokenizer()
    gpt2 = char_tokenizer()
    gpt2.add_special_tokens({"bos_token": "<s>"})
    llama = char_tokenizer()
    llama.add_special_tokens({"bos_token": "<s>"})
    llama.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", llama.bos_token_id)])
    for tok in (qwen, gpt2, llama):
        tok.chat_template = ("{{ bos_token or '' }}{% for m in messages %}Q: {{ m['content'] }}"
                             "{% endfor %}{% if add_generation_prompt %}\nA:{% endif %}")
    return {"llama": llama, "gpt2": gpt2, "qwen": qwen}


def test_prompts_are_encoded_as_the_tokenizer_encodes_text():
    """Plain prompts get exactly the special tokens the tokenizer itself adds (Llama-style: its
    BOS; GPT-2- and Qwen-style: none, even where a BOS is declared); a chat template's output
    gets none added (its template wrote them), as apply_chat_template encodes it."""
    from nftune.data import format_prompt
    from nftune.rollout import encode_prompts

    for name, tok in _three_tokenizers().items():
        body = tok("1+2", add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if name == "llama" else []  # written down per convention
        assert encode_prompts(tok, ["1+2"]) == [bos + body], name
        chat = format_prompt("1+2", "chat:raw", tok)
        expected = tok.apply_chat_template([{"role": "user", "content": "1+2"}],
                                           add_generation_prompt=True, tokenize=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert encode_prompts(tok, [chat]) == [list(expected)], name
        if tok.bos_token:  # the template's BOS, once
            assert encode_prompts(tok, [chat])[0].count(tok.bos_token_id) == 1, name
        # mixed in one batch, each keeps its own encoding and its place
        assert encode_prompts(tok, [chat, "1+2"]) == [list(expected), bos + body], name

"""The six objectives against closed forms, the paper's propositions and a second method.

Everything runs in float64; expectations are written out by hand from BRIEF.md, never by
calling the function under test a second time.
"""

import math

import pytest
import torch

from nftune.objectives import OBJECTIVES, compute_loss, nft_token_loss

TOKEN_ALGOS = ["nft", "rft", "grpo", "dr_grpo", "dapo"]


@pytest.fixture(autouse=True)
def float64():
    """Every tensor of these tests is float64; restored afterwards for the other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_batch(groups=4, k=4, t=6, seed=0, r_hat_values=None, spread=0.3):
    """Random groups of K answers with binary rewards; r̂ is each group's accuracy."""
    g = torch.Generator().manual_seed(seed)
    b = groups * k
    correct = torch.zeros(b)
    for q in range(groups):
        n_pos = (q % (k - 1)) + 1 if r_hat_values is None else round(r_hat_values[q] * k)
        correct[q * k: q * k + n_pos] = 1
    group_ids = torch.arange(groups).repeat_interleave(k)
    r_hat = torch.stack([correct[group_ids == q].mean() for q in range(groups)])[group_ids]
    old = -torch.rand(b, t, generator=g) * 2 - 0.1
    logprobs = old + spread * torch.randn(b, t, generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
    return logprobs, old, mask, correct, r_hat, group_ids


def grad_of(algo, logprobs, old, mask, reward, r_hat, group_ids=None, num_tokens=None, **kw):
    lp = logprobs.clone().requires_grad_(True)
    loss, metrics = compute_loss(algo, lp, old, mask, reward, r_hat, group_ids=group_ids,
                                 num_tokens=num_tokens, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


# --- Prop. 4.1: the NFT gradient in closed form ----------------------------------------------

@pytest.mark.parametrize("weight", ["one", "dr_grpo", "grpo"])
@pytest.mark.parametrize("eps", [1.0, 0.5, 0.05])
def test_nft_gradient_matches_prop_4_1(weight, eps):
    lp, old, mask, correct, r_hat, gid = make_batch(spread=0.6, seed=1)
    loss, grad, _ = grad_of("nft", lp, old, mask, correct, r_hat, gid, weight=weight, eps=eps)
    n = mask.sum()
    for i in range(lp.shape[0]):
        rh = r_hat[i].item()
        r = correct[i].item()
        omega = {"one": 1.0, "dr_grpo": 1 - rh, "grpo": math.sqrt((1 - rh) / rh)}[weight]
        for t in range(lp.shape[1]):
            if mask[i, t] == 0:
                assert grad[i, t] == 0
                continue
            R = math.exp(lp[i, t].item() - old[i, t].item())
            x = (1 - rh * R) / (1 - rh)
            dL_dR = -omega * (r / R - (1 - r) * (rh / (1 - rh)) / max(x, eps))
            # ∂R/∂logπ_θ = R, and the loss is divided by the token count
            assert grad[i, t].item() == pytest.approx(dL_dR * R / n.item(), abs=1e-10)


def test_nft_value_by_hand():
    # one wrong answer, r̂ = 0.5, ω = 1 − r̂ = 0.5, two tokens with R = 0.8 and R = 1.25
    lp = torch.log(torch.tensor([[0.8, 1.25]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    args = (lp, old, mask, torch.tensor([0.0]), torch.tensor([0.5]))
    loss, m = compute_loss("nft", *args, eps=1.0)
    # token 1: x = (1 − 0.4)/0.5 = 1.2 → −0.5 log 1.2; token 2: x = 0.75 < ε → value log 1 = 0
    assert loss.item() == pytest.approx(-0.5 * math.log(1.2) / 2, abs=1e-12)
    assert m["clip_fraction"] == pytest.approx(0.5)
    loss, _ = compute_loss("nft", *args, eps=0.5)
    assert loss.item() == pytest.approx(-0.5 * (math.log(1.2) + math.log(0.75)) / 2, abs=1e-12)


def test_nft_zero_at_start_of_update():
    _, old, mask, correct, r_hat, gid = make_batch()
    for weight in ["one", "dr_grpo", "grpo"]:
        for eps in [1.0, 0.1]:
            loss, grad, m = grad_of("nft", old.clone(), old, mask, correct, r_hat, gid,
                                    weight=weight, eps=eps)
            assert loss.item() == 0.0
            assert m["loss_pos"] == 0.0 and m["loss_neg"] == 0.0
            assert grad.abs().sum() > 0  # zero loss, but still a learning signal


def test_eps_clipping_keeps_straight_through_gradient():
    # A wrong answer whose negative ratio falls below ε: the value is clipped, the
    # gradient is that of log x scaled by 1/ε (the straight-through path), never zero.
    lp = torch.log(torch.tensor([[1.5]]))  # R = 1.5, r̂ = 0.5 → x = (1 − 0.75)/0.5 = 0.5
    old, mask = torch.zeros(1, 1), torch.ones(1, 1)
    for eps, expected_value in [(0.1, -0.5 * math.log(0.5)), (1.0, 0.0)]:
        loss, grad, m = grad_of("nft", lp, old, mask, torch.tensor([0.0]), torch.tensor([0.5]),
                                eps=eps)
        assert loss.item() == pytest.approx(expected_value, abs=1e-12)
        # dL/dR = −ω · (−(r̂/(1−r̂)) / max(x, ε)) = 0.5 / max(0.5, ε); times R = 1.5
        assert grad.item() == pytest.approx(0.5 / max(0.5, eps) * 1.5, abs=1e-12)
        assert m["clip_fraction"] == (1.0 if eps > 0.5 else 0.0)


# --- Prop. 4.2: on-policy NFT equals GRPO / Dr.GRPO ------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_prop_4_2_on_policy_equivalence(seed, eps):
    _, old, mask, correct, r_hat, gid = make_batch(groups=5, k=8, seed=seed)
    lp = old.clone()
    for weight, pg_algo in [("grpo", "grpo"), ("dr_grpo", "dr_grpo")]:
        _, g_nft, _ = grad_of("nft", lp, old, mask, correct, r_hat, gid, weight=weight, eps=eps)
        _, g_pg, _ = grad_of(pg_algo, lp, old, mask, correct, r_hat, gid)
        torch.testing.assert_close(g_nft, g_pg, atol=1e-10, rtol=0)
    # and GRPO's gradient is the advantage itself: Â⁺ = sqrt((1−r̂)/r̂), Â⁻ = −sqrt(r̂/(1−r̂))
    _, g_pg, _ = grad_of("grpo", lp, old, mask, correct, r_hat, gid)
    adv = torch.where(correct > 0, torch.sqrt((1 - r_hat) / r_hat),
                      -torch.sqrt(r_hat / (1 - r_hat)))
    torch.testing.assert_close(g_pg, -adv[:, None] * mask / mask.sum(), atol=1e-10, rtol=0)


def test_grpo_clip_higher_by_hand():
    # Â > 0 with R = 1.5 > 1.28 → clipped (zero gradient); Â < 0 with R = 0.7 < 0.8 → clipped
    lp = torch.log(torch.tensor([[1.5, 1.1], [0.7, 0.9]]))
    old, mask = torch.zeros(2, 2), torch.ones(2, 2)
    correct, r_hat = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    loss, grad, m = grad_of("grpo", lp, old, mask, correct, r_hat, None)
    # Â = ±1 at r̂ = 1/2; losses: −1.28, −1.1, +0.8, +0.9
    assert loss.item() == pytest.approx((-1.28 - 1.1 + 0.8 + 0.9) / 4, abs=1e-12)
    expected = torch.tensor([[0.0, -1.1], [0.0, 0.9]]) / 4
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert m["clip_fraction"] == pytest.approx(0.5)


# --- aggregation and degenerate groups -------------------------------------------------------

@pytest.mark.parametrize("algo", TOKEN_ALGOS)
def test_micro_batch_invariance(algo):
    lp, old, mask, correct, r_hat, gid = make_batch(groups=6, k=4, seed=3, spread=0.5)
    _, whole, _ = grad_of(algo, lp, old, mask, correct, r_hat, gid)
    n = mask.sum()
    summed = torch.zeros_like(lp)
    for idx in [slice(0, 5), slice(5, 13), slice(13, 24)]:
        _, g, _ = grad_of(algo, lp[idx], old[idx], mask[idx], correct[idx], r_hat[idx],
                          gid[idx], num_tokens=n)
        summed[idx] += g
    torch.testing.assert_close(summed, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("algo", TOKEN_ALGOS)
@pytest.mark.parametrize("weight", ["one", "dr_grpo", "grpo"])
def test_degenerate_groups_give_zero(algo, weight):
    lp, old, mask, correct, r_hat, gid = make_batch(groups=2, k=4, r_hat_values=[0.0, 1.0],
                                                   spread=0.7)
    kw = {"weight": weight} if algo in ("nft", "rft") else {}
    loss, grad, metrics = grad_of(algo, lp, old, mask, correct, r_hat, gid, **kw)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(math.isfinite(v) for v in metrics.values())


def test_degenerate_groups_do_not_leak_into_mixed_batches():
    lp, old, mask, correct, r_hat, gid = make_batch(groups=3, k=4, r_hat_values=[0.0, 0.5, 1.0],
                                                   spread=0.7)
    _, grad, _ = grad_of("nft", lp, old, mask, correct, r_hat, gid, weight="grpo")
    assert torch.isfinite(grad).all()
    assert grad[:4].abs().sum() == 0 and grad[8:].abs().sum() == 0
    assert grad[4:8].abs().sum() > 0


def test_rft_is_likelihood_on_correct_answers():
    lp, old, mask, correct, r_hat, gid = make_batch(spread=0.4)
    _, grad, m = grad_of("rft", lp, old, mask, correct, r_hat, gid)
    # − Σ r log π_θ / N  →  gradient −r/N on every response token of a correct answer
    expected = -(correct[:, None] * mask) / mask.sum()
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert m["loss_neg"] == 0.0


# --- InfoNCA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.02])
@pytest.mark.parametrize("sft_coef", [0.0, 1.0])
def test_infonca_with_two_answers_is_dpo(beta, sft_coef):
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(2, 5, generator=g)
    lp = old + 0.5 * torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0])
    s = ((lp - old) * mask).sum(1)  # s_θ = log π_θ(a|q) − log π_old(a|q)
    dpo = -torch.log(torch.sigmoid(beta * (s[0] - s[1])))
    sft = -(lp[0] * mask[0]).sum() / mask[0].sum()
    loss, _ = compute_loss("infonca", lp, old, mask, correct, torch.tensor([0.5, 0.5]),
                           group_ids=torch.tensor([3, 3]), beta=beta, sft_coef=sft_coef)
    assert loss.item() == pytest.approx((dpo + sft_coef * sft).item(), abs=1e-12)


def test_infonca_by_hand_with_several_groups():
    # group 0: three answers, two correct; group 1: no correct answer (contributes nothing)
    s = torch.tensor([0.3, -0.2, 0.5, 1.0, 2.0])
    lp = s[:, None].clone()
    old = torch.zeros(5, 1)
    mask = torch.ones(5, 1)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    r_hat = torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0, 0.0])
    beta = 0.5
    z = sum(math.exp(beta * v) for v in [0.3, -0.2, 0.5])
    expected = -0.5 * (beta * 0.3 - math.log(z)) - 0.5 * (beta * 0.5 - math.log(z))
    loss, m = compute_loss("infonca", lp, old, mask, correct, r_hat,
                           group_ids=torch.tensor([0, 0, 0, 1, 1]), beta=beta, sft_coef=0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["groups_with_positive"] == 1


# --- Theorem 3.1 numerically -----------------------------------------------------------------

def test_theorem_3_1_negative_likelihood_recovers_positive_policy():
    """Fitting π⁻_θ = (π_old − r̂ π⁺_θ)/(1 − r̂) to the negatives alone gives π⁺_θ = π(a|r=1)."""
    g = torch.Generator().manual_seed(0)
    n = 8
    pi_old = torch.softmax(torch.randn(n, generator=g), 0)
    r = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0], dtype=torch.float64)
    r_hat = (pi_old * r).sum()
    target_pos = pi_old * r / r_hat  # π(a | q, r = 1)
    neg_data = pi_old * (1 - r) / (1 - r_hat)  # the exact distribution of wrong answers
    theta = torch.log(pi_old).clone().requires_grad_(True)  # start at π⁺_θ = π_old
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(4000):
        log_ratio = (torch.log_softmax(theta, 0) - torch.log(pi_old))[:, None]  # log R per answer
        _, _, neg, _ = nft_token_loss(log_ratio, torch.zeros(n), r_hat.expand(n), weight="one",
                                      eps=1e-9)
        loss = (neg_data[:, None] * neg).sum()  # − E_{a ~ π⁻} log π⁻_θ(a)/π_old(a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pos = torch.softmax(theta.detach(), 0)
    kl = (target_pos[r > 0] * torch.log(target_pos[r > 0] / pos[r > 0])).sum()
    assert kl.item() < 1e-4


# --- bad input -------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    lp, old, mask, correct, r_hat, gid = make_batch()
    cases = [
        (dict(algo="ppo"), "algo"),
        (dict(old_logprobs=old[:, :3]), "old_logprobs"),
        (dict(mask=mask[:3]), "mask"),
        (dict(reward=correct[:3]), "reward"),
        (dict(r_hat=r_hat * 2), "r_hat"),
        (dict(logprobs=lp.clone().fill_(float("nan"))), "logprobs"),
        (dict(hp={"weight": "sqrt"}), "weight"),
        (dict(hp={"epsilon": 0.1}), "hparams"),
    ]
    for override, name in cases:
        kw = dict(algo="nft", logprobs=lp, old_logprobs=old, mask=mask, reward=correct,
                  r_hat=r_hat)
        hp = override.pop("hp", {})
        kw.update(override)
        with pytest.raises(ValueError, match=name):
            compute_loss(**kw, **hp)
    with pytest.raises(ValueError, match="group_ids"):
        compute_loss("infonca", lp, old, mask, correct, r_hat)


def test_registry_lists_the_six_objectives():
    assert sorted(OBJECTIVES) == sorted(["nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"])


def test_dapo_overlong_penalty_by_hand():
    # one group of four; DAPO's reward is ±1 (Eq. 9) plus the overlong penalty: [1, 0.5, −1, −2]
    old = torch.zeros(4, 2)
    lp = old.clone()
    mask = torch.ones(4, 2)
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    r_hat = torch.full((4,), 0.5)
    penalty = torch.tensor([0.0, -0.5, 0.0, -1.0])
    _, grad, _ = grad_of("dapo", lp, old, mask, correct, r_hat, torch.zeros(4, dtype=torch.long),
                         overlong_penalty=penalty)
    rewards = [1.0, 0.5, -1.0, -2.0]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / 4)
    expected = torch.tensor([-(x - mean) / std / 8 for x in rewards])[:, None].expand(4, 2)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_max_v_is_exact_for_huge_ratios():
    from nftune.objectives import max_v

    x = torch.tensor([-3.0e7, -5.0, 0.5, 2.0, 4.0e8], dtype=torch.float32, requires_grad=True)
    value = max_v(x, 1.0)
    assert value.tolist() == [1.0, 1.0, 1.0, 2.0, 4.0e8]  # exactly ε where clipped
    value.sum().backward()
    assert x.grad.tolist() == [1.0] * 5  # straight through


def test_nft_loss_stays_finite_far_off_policy():
    # log R = 20 on a wrong answer with r̂ = 0.25: the negative ratio is about −1.6e8
    f32 = dict(dtype=torch.float32)  # where the former sg(max − x) + x rounded to 0
    log_ratio = torch.full((4, 3), 20.0, **f32, requires_grad=True)
    correct = torch.tensor([1.0, 0.0, 0.0, 0.0], **f32)
    r_hat = torch.full((4,), 0.25, **f32)
    loss, metrics = compute_loss("nft", log_ratio, torch.zeros(4, 3, **f32),
                                 torch.ones(4, 3, **f32), correct, r_hat)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_ratio.grad).all()


def test_nft_clip_fraction_is_of_wrong_answers_and_ignores_float_noise():
    # two correct answers, two wrong; r̂ = 0.5, ε = 1. Wrong answer 1: R = 1.25 on both tokens
    # (x = (1 − 0.625)/0.5 = 0.75 < ε: clipped); wrong answer 2: R = 1 (x = 1: not clipped).
    # Half of the wrong answers' tokens are clipped (a quarter of all tokens).
    lp = torch.log(torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.25, 1.25], [1.0, 1.0]],
                                dtype=torch.float64))
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    args = (lp, torch.zeros(4, 2, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64),
            correct, torch.full((4,), 0.5, dtype=torch.float64))
    _, m = compute_loss("nft", *args, eps=1.0)
    assert m["clip_fraction"] == pytest.approx(0.5)
    # on-policy up to float rounding (R = 1 + 1e-7): nothing is clipped
    on_policy = (torch.zeros(4, 2, dtype=torch.float64) + 1e-7, *args[1:])
    assert compute_loss("nft", *on_policy, eps=1.0)[1]["clip_fraction"] == 0.0


def test_infonca_logs_no_placeholder_clip_fraction():
    _, old, mask, correct, r_hat, gid = make_batch()
    _, m = compute_loss("infonca", old.clone(), old, mask, correct, r_hat, group_ids=gid)
    assert "clip_fraction" not in m


def test_token_weights_scale_each_tokens_loss_and_gradient():
    """Truncated importance sampling by hand on GRPO's example above: weights w multiply each
    token's loss and gradient; the normaliser stays the token count."""
    lp = torch.log(torch.tensor([[1.5, 1.1], [0.7, 0.9]], dtype=torch.float64))
    lp.requires_grad_(True)
    old, mask = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2)
    correct, r_hat = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    w = torch.tensor([[2.0, 0.5], [1.0, 3.0]], dtype=torch.float64)
    loss, _ = compute_loss("grpo", lp, old, mask, correct, r_hat, token_weights=w)
    loss.backward()
    assert loss.item() == pytest.approx((-1.28 * 2 - 1.1 * 0.5 + 0.8 + 0.9 * 3) / 4, abs=1e-12)
    expected = torch.tensor([[0.0, -1.1 * 0.5], [0.0, 0.9 * 3]], dtype=torch.float64) / 4
    torch.testing.assert_close(lp.grad, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="token_weights: 'infonca' is not a token-mean"):
        compute_loss("infonca", lp.detach(), old, mask, correct, r_hat,
                     group_ids=torch.tensor([0, 0]), token_weights=w)


def test_truncated_is_weights_by_hand():
    """min(π_old / π_engine, cap) per response token; 1 off the response; None when off."""
    from nftune.rollout import Rollout
    from nftune.update import truncated_is_weights

    batch = Rollout(
        input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4),
        prompt_len=1, response_mask=torch.tensor([[1, 1, 0]]), truncated=torch.tensor([False]),
        group_ids=torch.tensor([0]), texts=["x"],
        old_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
        engine_logprobs=torch.tensor([[-2.0, -1.5, 0.0]]))
    weights = truncated_is_weights(batch, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, math.exp(-0.5), 1.0]]))
    assert truncated_is_weights(batch, cap=0.0) is None


def test_the_objective_input_table_lists_every_field():
    """docs/objectives.md's field table is the dataclass's fields, no more and no fewer."""
    import dataclasses
    import re
    from pathlib import Path

    from nftune.objectives import ObjectiveInput

    page = (Path(__file__).resolve().parents[1] / "docs" / "objectives.md").read_text()
    table = page.split("| field | shape | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(documented) == sorted(f.name for f in dataclasses.fields(ObjectiveInput))

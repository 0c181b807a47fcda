"""Tests for ppo.py: GAE against a hand computation with EOS in the middle, masked whitening,
the clipped losses' gradients, the per-token KL reward, the adaptive KL controller, the ratio
of exactly 1 on the first minibatch, a toy reward that a few PPO steps must raise, and tiny
end-to-end runs (RM reward, oracle reward with PPO-ptx, exact --resume)."""

import copy
import dataclasses
import json
import math
import os

import pytest
import torch

import ppo
import train_utils
import sft
import tasks
from data import UserError, encode_prompt, train_tokenizer
from model import ModelConfig, Transformer
from train_utils import configure_optimizer
from reward import RewardModel, load_reward_model

VOCAB = 300
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    texts = [p + "\n" + r for p, r in tasks.ift_seed(1, 200)]
    return train_tokenizer(texts, VOCAB)


def tiny_model(tok, seed=0, std=0.5):
    """A random tiny decoder with large weights: a peaked next-token distribution, so a few
    samples already differ in what they contain."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                max_seq_len=96, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return m.eval()


def prompts(tok, n=16):
    return [encode_prompt(tok, p) for p, _ in tasks.ift_seed(2, n)]


def four_models(tok, seed=0):
    policy = tiny_model(tok, seed)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value = RewardModel(copy.deepcopy(policy), head="zero").eval()
    return policy, reference, value


def small_cfg(**kw):
    base = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, max_new_tokens=8, temperature=1.0)
    base.update(kw)
    return ppo.PPOConfig(**base)


# -----------------------------------------------------------------------------
# Advantages


def test_gae_on_a_hand_example_with_eos_in_the_middle():
    """Row 0 ends (EOS) at token 2: rewards and values after it are junk and must not count;
    V after the last token is 0. γ = 1, λ = 0.95, by hand:
        δ2 = 1.0 + 0 - 0.3 = 0.7                 A2 = 0.7
        δ1 = -0.2 + 0.3 - 0.4 = -0.3             A1 = -0.3 + 0.95 * 0.7 = 0.365
        δ0 = 0.1 + 0.4 - 0.5 = 0.0               A0 = 0.95 * 0.365 = 0.34675
    Row 1 runs to the end; its advantages are Σ_l (γλ)^l δ_{t+l}, with γ = 1 here."""
    rewards = torch.tensor([[0.1, -0.2, 1.0, 7.0, 7.0], [0.0, 0.5, 0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[0], torch.tensor([0.34675, 0.365, 0.7, 0.0, 0.0]))
    torch.testing.assert_close(ret[0], torch.tensor([0.84675, 0.765, 1.0, 0.0, 0.0]))
    v = values[1].tolist() + [0.0]
    deltas = [rewards[1, t].item() + v[t + 1] - v[t] for t in range(5)]
    want = [sum(0.95 ** l * deltas[t + l] for l in range(5 - t)) for t in range(5)]
    torch.testing.assert_close(adv[1], torch.tensor(want))
    torch.testing.assert_close(ret[1], adv[1] + values[1])


def test_gae_with_gamma_below_one_discounts_the_next_value():
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.6]]), torch.ones(1, 2)
    adv, _ = ppo.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # A1 = 1 - 0.6 = 0.4; A0 = (0 + 0.5 * 0.6 - 0.2) + 0.5 * 0.4 = 0.3
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.4]]))


def test_whitening_respects_the_mask():
    """Mean 0 and std 1 over the response tokens only; zero after EOS; what the masked-out
    entries hold changes nothing."""
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 100.0, -100.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = ppo.masked_whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    torch.testing.assert_close(ppo.masked_whiten(x.masked_fill(mask == 0, 1e6), mask), w)
    vals = torch.tensor([1.0, 2, 3, 4, 5])
    torch.testing.assert_close(real, (vals - vals.mean()) / vals.std(unbiased=False), rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# The losses


def test_clipped_policy_gradient_vanishes_outside_the_clip_range():
    """ρ beyond 1 + ε with A > 0, or below 1 - ε with A < 0: the clipped term wins and the
    gradient is exactly 0. Inside the range, or outside it on the side the advantage does not
    favour, the gradient is -A ρ / n per token."""
    eps = 0.2
    ratios = torch.tensor([1.5, 1.1, 0.5, 0.5, 1.5, 0.9])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    zero_grad = torch.tensor([True, False, True, False, False, False])
    logp = ratios.log().clone().requires_grad_(True)
    loss, stats = ppo.policy_loss(logp[None], torch.zeros(1, 6), adv[None], torch.ones(1, 6), eps)
    loss.backward()
    assert (logp.grad[zero_grad] == 0).all()
    torch.testing.assert_close(logp.grad[~zero_grad], (-adv * ratios / 6)[~zero_grad])
    assert stats["clip_frac"] == pytest.approx(4 / 6)  # 1.5, 0.5, 0.5, 1.5 are outside (2 of them get no gradient)
    # at ρ = 1 the loss is -mean(A) and approx-KL is 0
    loss1, stats1 = ppo.policy_loss(torch.zeros(1, 6), torch.zeros(1, 6), adv[None], torch.ones(1, 6), eps)
    assert loss1.item() == pytest.approx(-adv.mean().item())
    assert stats1["approx_kl"] == 0 and stats1["clip_frac"] == 0


def test_clip_fraction_counts_every_token_outside_the_range():
    ratios = torch.tensor([[1.5, 1.1, 0.5, 0.7]])
    _, stats = ppo.policy_loss(ratios.log(), torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[1.0, 1, 1, 0]]), 0.2)
    assert stats["clip_frac"] == pytest.approx(2 / 3)  # the 4th token is masked out


def test_clipped_value_loss_by_hand():
    """0.5 · mean over tokens of max((V - R)², (V_clip - R)²), V_clip = V_old ± clip."""
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old, ret = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[2.0, 1.0, -1.0]])
    loss, frac = ppo.value_loss(values, old, ret, torch.ones(1, 3), clip=0.2)
    # token 0: V=1 (clipped 0.2): max(1, 3.24) = 3.24; token 1: 1; token 2: V=.5 (clipped .2): max(2.25, 1.44) = 2.25
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1 + 2.25) / 3)
    assert frac == pytest.approx(2 / 3)
    loss.backward()
    assert values.grad[0, 0] == 0  # the clipped error is the larger: no gradient through V there


def test_adaptive_kl_controller():
    """Ziegler et al.: β(1 + clip(KL/target - 1, ±0.2) · n/horizon)."""
    up = ppo.update_kl_coef(0.1, kl=12.0, n=64, target=6.0, horizon=10000)  # error clipped to +0.2
    assert up == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert ppo.update_kl_coef(0.1, kl=5.4, n=100, target=6.0, horizon=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.update_kl_coef(0.1, kl=6.0, n=100, target=6.0, horizon=1000) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny SFT checkpoint (pretraining 3 steps, then SFT 100 steps) that ends most replies
    with EOS, and a 'reward model' made of its trunk with a random head."""
    out = tmp_path_factory.mktemp("sft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's one-thread fixture is per test: it has not run yet here
    base = dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=128, batch_size=16,
                seq_len=32, warmup_steps=2, eval_every=0, corpus_docs=200, device="cpu", show_example=False,
                dropout=0.0)
    try:
        m0 = sft.main(sft.SFTConfig(mode="pretrain", out_dir=str(out / "m0"), max_steps=3, **base))
        ckpt = sft.main(sft.SFTConfig(mode="sft", init=m0, out_dir=str(out / "sft"), max_steps=100, lr=3e-3,
                                      n_ift=200, n_eft=0, **base))
        torch.manual_seed(0)
        rm, t = load_reward_model(ckpt, head="new")
        rm.save_pretrained(str(out / "rm"), t)
    finally:
        torch.set_num_threads(threads)
    return ckpt, str(out / "rm")


# -----------------------------------------------------------------------------
# Rollouts and the per-token reward


def test_per_token_kl_is_zero_when_policy_equals_reference(sft_model):
    """Policy = reference: every per-token KL is exactly 0, so the reward is the score on the
    last response token (the EOS where there is one) and 0 elsewhere. Against another
    reference the KL is non-zero on response tokens and still 0 after EOS."""
    from checkpoint import load_checkpoint

    policy, tok = load_checkpoint(sft_model[0])
    policy.eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    value = RewardModel(copy.deepcopy(policy), head="zero").eval()
    cfg = small_cfg(max_new_tokens=20)
    batch = ppo.rollout(policy, reference, value, prompts(tok), cfg, tok, torch.Generator().manual_seed(0))
    mask = batch["response_mask"]
    scores = torch.arange(16, dtype=torch.float) + 1
    rewards, kl = ppo.per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, kl_coef=0.1)
    assert (kl == 0).all()
    last = mask.sum(-1).long() - 1
    expected = torch.zeros_like(rewards)
    expected[torch.arange(16), last] = scores
    assert torch.equal(rewards, expected)
    assert bool(batch["finished"].any()) and not bool(batch["finished"].all())
    for i in torch.nonzero(batch["finished"]).flatten().tolist():
        assert batch["tokens"][i, last[i]] == tok.eos_id
    other = tiny_model(tok, seed=1)
    batch2 = ppo.rollout(policy, other, value, prompts(tok), cfg, tok, torch.Generator().manual_seed(0))
    _, kl2 = ppo.per_token_rewards(scores, batch2["logprobs"], batch2["ref_logprobs"], batch2["response_mask"], 0.1)
    assert (kl2[batch2["response_mask"] == 1] != 0).all() and (kl2[batch2["response_mask"] == 0] == 0).all()
    assert (batch2["logprobs"][batch2["response_mask"] == 0] == 0).all()


def test_rollout_logprobs_are_the_samplers_at_the_same_temperature(tok):
    """The rollout's recomputed log-probs equal the sampler's (log softmax(logits / T) of the
    sampled token): the same temperature in sampling and in scoring."""
    from sampling import generate

    policy, reference, value = four_models(tok)
    cfg = small_cfg(temperature=0.7)
    batch = ppo.rollout(policy, reference, value, prompts(tok), cfg, tok, torch.Generator().manual_seed(3))
    g = generate(policy, prompts(tok), cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.7,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(g.tokens, batch["tokens"])
    torch.testing.assert_close(batch["logprobs"], g.logprobs, atol=1e-4, rtol=1e-4)


def test_ratio_is_exactly_one_on_the_first_minibatch(tok):
    """The first minibatch is scored by the weights that produced the rollout, with dropout off
    and the same temperature: ρ = 1 on every token (the step logs max |ρ - 1|). Later
    minibatches see updated weights (approx-KL > 0)."""
    policy, reference, value = four_models(tok)
    cfg = small_cfg(temperature=0.7, lr=1e-2)
    po = configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.95), CPU)
    vo = configure_optimizer(value, cfg.value_lr, 0.0, (0.9, 0.95), CPU)
    score_fn = lambda b: (torch.randn(len(b["finished"]), generator=torch.Generator().manual_seed(0)), {})
    stats = ppo.ppo_step(policy, reference, value, po, vo, prompts(tok), score_fn, 0.05, cfg, tok,
                         torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert stats["first_ratio_dev"] < 1e-6
    assert stats["approx_kl"] > 0


def test_a_few_ppo_steps_raise_a_toy_reward(tok):
    """Reward = the share of response tokens that are token X (the most frequent token of the
    first samples, about 4% of them): eight PPO steps make the policy emit X most of the time."""
    policy, reference, value = four_models(tok)
    cfg = small_cfg(kl_coef=0.0, lr=2e-2, value_lr=1e-3)
    po = configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.95), CPU)
    vo = configure_optimizer(value, cfg.value_lr, 0.0, (0.9, 0.95), CPU)
    first = ppo.rollout(policy, reference, value, prompts(tok), cfg, tok, torch.Generator().manual_seed(0))
    sampled = first["tokens"][first["response_mask"].bool()]
    X = int(torch.mode(sampled[sampled != tok.eos_id]).values)
    before = (sampled == X).float().mean().item()

    def score_fn(b):
        share = ((b["tokens"] == X).float() * b["response_mask"]).sum(-1) / b["response_mask"].sum(-1)
        return share, {"share": share.mean().item()}

    shares = [ppo.ppo_step(policy, reference, value, po, vo, prompts(tok), score_fn, 0.0, cfg, tok,
                           torch.Generator().manual_seed(100 + s), torch.Generator().manual_seed(s))["share"]
              for s in range(8)]
    assert before < 0.1
    assert sum(shares[-2:]) / 2 > 0.5, shares


# -----------------------------------------------------------------------------
# End to end


def ppo_cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=16,
                max_steps=4, eval_every=2, n_eval=8, n_norm=16, corpus_docs=200, eval_batches=2,
                ptx_batch_size=4, ptx_seq_len=32, warmup_steps=1, lr=1e-3, device="cpu")
    base.update(kw)
    return ppo.PPOConfig(**base)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def killed_after_step_2_then_resumed(cfg, monkeypatch):
    """ppo.main(cfg) interrupted right after its step-2 checkpoint, then run again with
    --resume; returns the resumed run's checkpoint."""
    real = train_utils.OutDir.save

    def save_then_crash(self, model, tok_, opt, step, *args, **kwargs):
        real(self, model, tok_, opt, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_utils.OutDir, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            ppo.main(cfg)
    return ppo.main(dataclasses.replace(cfg, resume=True))


def test_end_to_end_metrics_and_exact_resume(sft_model, tmp_path, monkeypatch):
    """Every step logs the issue's metrics, eval rows the oracle and the KL from SFT; a run
    stopped after step 2 and resumed ends with the same policy, value model and β (adaptive)
    as an uninterrupted one."""
    init, rm = sft_model
    kw = dict(init=init, reward_model=rm, save_every=2, kl_target=1.0, kl_horizon=100)
    a = ppo.main(ppo_cfg(tmp_path / "a", **kw))
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for k in ("rm_score", "oracle", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_var",
              "response_len", "no_eos", "score", "kl_coef"):
        assert all(math.isfinite(r[k]) for r in rows), k
    assert rows[0]["first_ratio_dev"] < 1e-6 and rows[0]["kl"] == 0  # step 1: policy = reference
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved β
    assert {"eval_oracle_mean", "eval_kl_from_sft", "eval_rm_score", "eval_pretrain_loss"} <= set(rows[1])
    report = json.load(open(tmp_path / "a" / "eval.json"))
    assert report["sft"]["kl_from_sft"] == 0 and "mean_diff_ci" in report["compare"]

    b = killed_after_step_2_then_resumed(ppo_cfg(tmp_path / "b", **kw), monkeypatch)
    wa, wb = (Transformer.from_pretrained(p).state_dict() for p in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = (torch.load(os.path.join(p, "trainer_state.pt"), weights_only=True) for p in (a, b))
    for k in sa["value_model"]:
        assert torch.equal(sa["value_model"][k], sb["value_model"][k]), k
    assert sa["kl_coef"] == sb["kl_coef"]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]


def test_oracle_reward_zero_value_head_and_ptx(sft_model, tmp_path):
    """--reward oracle --value_init zero needs no reward model; --ptx_coef adds the pretraining
    loss (logged) to the policy's."""
    init, _ = sft_model
    ppo.main(ppo_cfg(tmp_path / "o", init=init, reward="oracle", value_init="zero", ptx_coef=1.0, max_steps=2))
    rows = read_metrics(tmp_path / "o")
    assert all(math.isfinite(r["ptx_loss"]) and "rm_score" not in r for r in rows)
    assert rows[0]["value_mean"] == 0  # a zero head: V = 0 before the first update
    assert 0 <= rows[0]["oracle"] <= 5


def test_flags_are_checked_before_anything_is_written(sft_model, tmp_path):
    init, _ = sft_model
    with pytest.raises(UserError, match="--reward_model"):
        ppo.main(ppo_cfg(tmp_path / "x", init=init))
    with pytest.raises(UserError, match="--minibatch_size"):
        ppo_cfg(tmp_path / "x", init=init, minibatch_size=9)
    assert not os.path.exists(tmp_path / "x")


# -----------------------------------------------------------------------------
# Critic-free: RLOO and GRPO (--advantage rloo | grpo)


def test_rloo_advantages_by_hand():
    """A_i = r_i - mean of the OTHER k-1 rewards of its prompt. Group 1 (1, 2, 3, 6):
        A_0 = 1 - 11/3 = -8/3,  A_1 = 2 - 10/3 = -4/3,  A_2 = 3 - 9/3 = 0,  A_3 = 6 - 6/3 = 4
    (a baseline that included the sample itself, r_i - mean, would give -2, -1, 0, 3). A group of
    equal rewards gets 0; groups do not mix; k = 2 gives ±(r_1 - r_2)."""
    scores = torch.tensor([1.0, 2, 3, 6, 5, 5, 5, 5])
    torch.testing.assert_close(ppo.rloo_advantages(scores, 4),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(ppo.rloo_advantages(torch.tensor([0.0, 1.0, 7.0, 3.0]), 2),
                               torch.tensor([-1.0, 1.0, 4.0, -4.0]))
    # the estimator is k/(k-1) (r - mean): the leave-one-out form, rescaled
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    g = r.view(-1, 3)
    torch.testing.assert_close(ppo.rloo_advantages(r, 3), (1.5 * (g - g.mean(-1, keepdim=True))).flatten())


def test_grpo_advantages_by_hand_and_the_std_switch():
    """(r - group mean) / (group std + 1e-4), std with Bessel's correction. Group (1, 2, 3, 6):
    mean 3, std sqrt(14/3); a group of equal rewards gets exactly 0 (not 0/0); a group ten times
    as spread gets the same advantages. --no-grpo_std (Dr. GRPO): r - mean only."""
    scores = torch.tensor([1.0, 2, 3, 6, 5, 5, 5, 5, 10, 20, 30, 60])
    adv = ppo.grpo_advantages(scores, 4)
    centred = torch.tensor([-2.0, -1, 0, 3])
    torch.testing.assert_close(adv[:4], centred / (math.sqrt(14 / 3) + 1e-4))
    assert (adv[4:8] == 0).all()
    torch.testing.assert_close(adv[8:], 10 * centred / (math.sqrt(1400 / 3) + 1e-4))  # = adv[:4] up to eps
    plain = ppo.grpo_advantages(scores, 4, normalize_std=False)
    torch.testing.assert_close(plain, torch.cat([centred, torch.zeros(4), 10 * centred]))
    assert ppo.grpo_advantages(torch.tensor([0.0, 1.0]), 2)[1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))


def test_k3_kl_by_hand_and_masked():
    """k3 = π_ref/π - log(π_ref/π) - 1 per token, averaged over response tokens: π = 0.5, π_ref
    = 0.25 gives 0.5 + log 2 - 1; π = π_ref gives 0. After EOS nothing counts, however extreme the
    log-probs there (no inf or NaN in the loss or its gradient). Its gradient lowers log π where
    π > π_ref and raises it where π < π_ref."""
    logp = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.1), -1000.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3), math.log(0.2), 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss = ppo.k3_kl(logp, ref, mask)
    want = ((0.5 + math.log(2) - 1) + 0 + (2 - math.log(2) - 1)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 3] == 0
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] == 0 and logp.grad[0, 2] < 0  # d/dlogπ = (1 - π_ref/π) / n


def test_grpo_kl_term_pulls_the_policy_towards_the_reference(tok):
    """GRPO's β · k3 is a loss term: with every advantage 0, one update with β = 1 lowers the k3
    KL to the reference on the batch, β = 0 leaves the policy where it was."""
    before, after = {}, {}
    for beta in (1.0, 0.0):
        policy = tiny_model(tok)
        reference = copy.deepcopy(policy).requires_grad_(False)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            for p in reference.parameters():
                if p.dim() >= 2:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        cfg = small_cfg(lr=1e-3, advantage="grpo", group_size=4, ppo_epochs=1, minibatch_size=16)
        po = configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.95), CPU)
        batch = ppo.rollout(policy, reference, None, prompts(tok, 4), cfg, tok, torch.Generator().manual_seed(0))
        batch["advantages"] = torch.zeros_like(batch["logprobs"])

        def k3():
            with torch.no_grad():
                lp, _ = ppo.response_logprobs(policy, batch["sequences"], batch["attention_mask"], batch["prompt_len"],
                                              cfg.temperature)
            return ppo.k3_kl(lp, batch["ref_logprobs"], batch["response_mask"]).item()

        before[beta] = k3()
        stats = ppo.ppo_update(policy, None, po, None, batch, cfg, torch.Generator().manual_seed(0), kl_coef=beta)
        assert stats["kl_loss"] == pytest.approx(before[beta]) and before[beta] > 0.1  # one minibatch: ρ = 1
        after[beta] = k3()
    assert after[1.0] < 0.9 * before[1.0]
    assert after[0.0] == pytest.approx(before[0.0])


def capture_step(monkeypatch, policy, reference, cfg, tok, n_prompts, kl_coef=0.1):
    """ppo_step with the update replaced by a recorder: the batch (advantages included) as PPO
    would train on it, and the scores it was given."""
    seen = {}

    def record(policy_, value_model, policy_opt, value_opt, batch, cfg_, gen, ptx_stream=None, kl_coef=0.0):
        seen["batch"] = batch
        return {}

    def score_fn(b):
        seen["scores"] = torch.randn(len(b["finished"]), generator=torch.Generator().manual_seed(5)).round()
        return seen["scores"], {}

    monkeypatch.setattr(ppo, "ppo_update", record)
    ppo.ppo_step(policy, reference, None, None, None, prompts(tok, n_prompts), score_fn, kl_coef, cfg, tok,
                 torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    return seen["batch"], seen["scores"]


@pytest.mark.parametrize("advantage,grpo_std", [("rloo", True), ("grpo", True), ("grpo", False)])
def test_group_advantages_in_a_step(sft_model, monkeypatch, advantage, grpo_std):
    """A step samples k responses to each prompt (rows p·k .. p·k+k-1 share the prompt) and gives
    every token of a response its sequence advantage, 0 after EOS. rloo: the scores minus
    β Σ_t (log π - log π_ref), leave-one-out; grpo: the scores alone (the KL is in the loss),
    std-normalised or not. No values, no returns: nothing of a critic."""
    from checkpoint import load_checkpoint

    policy, tok = load_checkpoint(sft_model[0])
    policy.eval()
    reference = tiny_model(tok, seed=1)  # another model: the KL is not 0
    k = 4
    cfg = small_cfg(advantage=advantage, group_size=k, grpo_std=grpo_std, max_new_tokens=20)
    batch, scores = capture_step(monkeypatch, policy, reference, cfg, tok, n_prompts=4)
    mask, P = batch["response_mask"], batch["prompt_len"]
    assert mask.shape[0] == 16 and (mask == 0).any()  # some responses end before the budget
    prompt_part = batch["sequences"][:, :P].view(4, k, P)
    assert (prompt_part == prompt_part[:, :1]).all() and not (prompt_part[0] == prompt_part[1]).all()
    assert "values" not in batch and "returns" not in batch
    kl = (batch["logprobs"] - batch["ref_logprobs"]).sum(-1)
    assert (kl.abs() > 1e-3).all()
    if advantage == "rloo":
        seq_adv = ppo.rloo_advantages(scores - 0.1 * kl, k)
    else:
        seq_adv = ppo.grpo_advantages(scores, k, normalize_std=grpo_std)
    torch.testing.assert_close(batch["advantages"], seq_adv[:, None] * mask)
    assert (batch["advantages"][mask == 0] == 0).all()


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_ratio_is_exactly_one_on_the_first_minibatch(tok, advantage):
    """As for gae: the first minibatch's ρ is 1 on every token, later ones moved; no value
    statistics; grpo logs its k3 KL term, which grows once the policy leaves the reference."""
    policy, reference, _ = four_models(tok)
    cfg = small_cfg(temperature=0.7, lr=1e-2, advantage=advantage, group_size=4)
    po = configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.95), CPU)
    score_fn = lambda b: (torch.randn(len(b["finished"]), generator=torch.Generator().manual_seed(0)), {})
    stats = ppo.ppo_step(policy, reference, None, po, None, prompts(tok, 4), score_fn, 0.05, cfg, tok,
                         torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert stats["first_ratio_dev"] < 1e-6
    assert stats["approx_kl"] > 0
    assert not {"value_loss", "value_grad_norm", "explained_var", "value_mean"} & set(stats)
    assert 0 <= stats["flat_groups"] <= 1 and stats["adv_abs"] > 0
    assert ("kl_loss" in stats) == (advantage == "grpo")
    if advantage == "grpo":
        assert stats["kl_loss"] > 0


def test_critic_free_grpo_raises_a_toy_reward(tok):
    """The toy reward of the gae test (share of token X, ~2% of the first samples), GRPO with 4
    responses to each of 4 prompts and no value model: eight steps raise it more than tenfold (a
    zero or sign-flipped advantage leaves it near 0)."""
    policy, reference, value = four_models(tok)
    cfg = small_cfg(kl_coef=0.0, lr=2e-2, advantage="grpo", group_size=4)
    po = configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.95), CPU)
    first = ppo.rollout(policy, reference, None, prompts(tok, 4), cfg, tok, torch.Generator().manual_seed(0))
    sampled = first["tokens"][first["response_mask"].bool()]
    X = int(torch.mode(sampled[sampled != tok.eos_id]).values)

    def score_fn(b):
        share = ((b["tokens"] == X).float() * b["response_mask"]).sum(-1) / b["response_mask"].sum(-1)
        return share, {"share": share.mean().item()}

    shares = [ppo.ppo_step(policy, reference, None, po, None, prompts(tok, 4), score_fn, 0.0, cfg, tok,
                           torch.Generator().manual_seed(100 + s), torch.Generator().manual_seed(s))["share"]
              for s in range(8)]
    assert (sampled == X).float().mean().item() < 0.05
    assert sum(shares[-3:]) / 3 > 0.25, shares


def test_grpo_oracle_run_builds_and_saves_no_value_model(sft_model, tmp_path, monkeypatch):
    """--advantage grpo --reward oracle: no --reward_model and no value model needed (loading
    any RewardModel fails the test); each step grades k responses to each of batch_size / k
    prompts, every response against its own prompt's task; the checkpoint's trainer state holds
    no value model or value optimizer; eval.json names the estimator and the peak memory."""
    init, _ = sft_model

    def no_value_model(*a, **kw):
        raise AssertionError("a critic-free run loaded a RewardModel")

    graded = []
    real_score = ppo.score_rollout

    def score_and_record(batch, prompt_tasks, *a, **kw):
        graded.append((len(batch["finished"]), [t.prompt for t in prompt_tasks]))
        return real_score(batch, prompt_tasks, *a, **kw)

    monkeypatch.setattr(ppo, "load_reward_model", no_value_model)
    monkeypatch.setattr(ppo, "score_rollout", score_and_record)
    ckpt = ppo.main(ppo_cfg(tmp_path / "g", init=init, reward="oracle", advantage="grpo", group_size=4,
                            max_steps=2, eval_every=0))
    rows = read_metrics(tmp_path / "g")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["first_ratio_dev"] < 1e-6 and rows[0]["kl"] == 0
    for r in rows:
        assert math.isfinite(r["kl_loss"]) and 0 <= r["flat_groups"] <= 1 and 0 <= r["oracle"] <= 5
        assert not {"value_loss", "explained_var", "value_mean"} & set(r)
    for n, names in graded:
        assert n == 8 == len(names)
        assert len(set(names)) == 2 and names[:4] == [names[0]] * 4 and names[4:] == [names[4]] * 4
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert "value_model" not in state and "value_optimizer" not in state
    assert {"step", "optimizer", "kl_coef", "oracle_norm"} <= set(state)
    report = json.load(open(tmp_path / "g" / "eval.json"))
    assert report["advantage"] == "grpo" and report["peak_memory_mb"] > 0


def test_rloo_run_against_the_rm_resumes_exactly(sft_model, tmp_path, monkeypatch):
    """--advantage rloo --reward rm: the RM scores, nothing becomes a value model; a run stopped
    after step 2 and resumed ends with the same policy as an uninterrupted one."""
    init, rm = sft_model
    kw = dict(init=init, reward_model=rm, advantage="rloo", group_size=2, save_every=2, eval_every=0)
    a = ppo.main(ppo_cfg(tmp_path / "a", **kw))
    rows = read_metrics(tmp_path / "a")
    assert all(math.isfinite(r["rm_score"]) and "value_loss" not in r and "kl_loss" not in r for r in rows)
    assert "value_model" not in torch.load(os.path.join(a, "trainer_state.pt"), weights_only=True)

    b = killed_after_step_2_then_resumed(ppo_cfg(tmp_path / "b", **kw), monkeypatch)
    wa, wb = (Transformer.from_pretrained(p).state_dict() for p in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_critic_free_flags_are_checked(sft_model, tmp_path):
    """An unknown estimator, a group of one, a batch that is not whole groups are refused by
    name; gae ignores --group_size; rloo/grpo with --reward rm still need --reward_model."""
    init, _ = sft_model
    with pytest.raises(UserError, match="--advantage"):
        ppo_cfg(tmp_path / "x", advantage="ppo")
    for adv in ("rloo", "grpo"):
        with pytest.raises(UserError, match="--group_size 1 "):
            ppo_cfg(tmp_path / "x", advantage=adv, group_size=1)
        with pytest.raises(UserError, match="--batch_size 8 .*multiple of --group_size 3"):
            ppo_cfg(tmp_path / "x", advantage=adv, group_size=3)
        with pytest.raises(UserError, match="--reward_model"):
            ppo.main(ppo_cfg(tmp_path / "x", init=init, advantage=adv))
    ppo_cfg(tmp_path / "x", group_size=3)  # gae: one response per prompt, --group_size unused
    with pytest.raises(UserError, match="--group_size 0 "):
        ppo_cfg(tmp_path / "x", group_size=0)
    assert not os.path.exists(tmp_path / "x")

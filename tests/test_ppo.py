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

    real = train_utils.OutDir.save

    def save_then_crash(self, model, tok_, opt, step, *args, **kwargs):
        real(self, model, tok_, opt, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    cfg_b = ppo_cfg(tmp_path / "b", **kw)
    with monkeypatch.context() as m:
        m.setattr(train_utils.OutDir, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            ppo.main(cfg_b)
    b = ppo.main(dataclasses.replace(cfg_b, resume=True))
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

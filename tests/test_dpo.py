"""Tests for dpo.py: the loss against hand computations, the reference (precomputed or live),
masking, one optimiser step, data checks, and a tiny end-to-end run with --resume."""

import dataclasses
import json
import math
import os

import pytest
import torch

import dpo
import train_utils
import sft
import tasks
from data import DataError, Preference, UserError, encode_prompt, encode_response, train_tokenizer
from model import ModelConfig, Transformer

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    texts = [p + "\n" + r for p, r in tasks.ift_seed(1, 200)]
    return train_tokenizer(texts, VOCAB)


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                max_seq_len=96, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id))
    with torch.no_grad():  # larger weights: log-probs that differ clearly between responses
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m


PREFS = [
    Preference("Sort these numbers in ascending order: 5 3 9", "Sorted: 3 5 9.", "Sorted: 9 5 3."),
    Preference("What is 12 plus 30?", "The sum is 42.", "I do not know, sorry about that."),
    Preference("Repeat the word cat 3 times.", "Repeated: cat cat cat.", "Repeated: cat."),
]


def encoded(tok):
    return dpo.encode_pairs(tok, PREFS, 96, "test")


# -----------------------------------------------------------------------------
# The loss


def test_loss_is_ln2_when_policy_equals_reference(tok):
    """Policy = reference: h = 0, the DPO loss is ln 2 per pair, implicit rewards 0, accuracy 1/2."""
    model = tiny_model(tok).eval()
    ids, mask = dpo.pair_batch(encoded(tok), tok.pad_id)
    with torch.no_grad():
        c, r = dpo.response_logps(model, ids, mask)
    losses, cr, rr, _ = dpo.preference_loss(c, r, c.clone(), r.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert cr.abs().max() == 0 and rr.abs().max() == 0
    assert dpo.batch_stats(losses, cr, rr, c, r)["reward_accuracy"] == 0.5


def test_losses_equal_hand_computation_on_two_pairs():
    """DPO, DPO with label smoothing and IPO on two pairs, against the equations written out."""
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    beta = 0.5
    h = [(-3 + 4) - (-5 + 4.5), (-10 + 9) - (-4 + 6)]  # [1.5, -3.0]
    sig = lambda x: 1 / (1 + math.exp(-x))
    dpo_ref = [-math.log(sig(beta * x)) for x in h]
    eps = 0.2
    smooth_ref = [-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h]
    ipo_ref = [(x - 1 / (2 * beta)) ** 2 for x in h]
    for kw, ref in [({}, dpo_ref), ({"label_smoothing": eps}, smooth_ref), ({"loss_type": "ipo"}, ipo_ref)]:
        losses, cr, rrw, _ = dpo.preference_loss(pc, pr, rc, rr, beta, **kw)
        torch.testing.assert_close(losses, torch.tensor(ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rrw, torch.tensor([-0.25, 1.0]))


def test_response_logps_sum_the_response_tokens_with_the_shift(tok):
    """pair_batch + response_logps give, per row, the sum over response tokens (EOS included) of
    log p(token | everything before it), computed here position by position."""
    model = tiny_model(tok, seed=1).eval()
    pairs = encoded(tok)
    ids, mask = dpo.pair_batch(pairs, tok.pad_id)
    with torch.no_grad():
        chosen, rejected = dpo.response_logps(model, ids, mask)
        for side, got in (("chosen", chosen), ("rejected", rejected)):
            for p, g in zip(pairs, got):
                seq = p["prompt"] + p[side]
                want = 0.0
                for t in range(len(p["prompt"]), len(seq)):
                    logits = model(torch.tensor([seq[:t]]))[0, -1]
                    want += logits.log_softmax(-1)[seq[t]].item()
                assert g.item() == pytest.approx(want, abs=1e-4)


def test_prompt_and_padding_carry_no_gradient(tok):
    """The loss does not depend on the log-probs of prompt or pad positions: the gradient of the
    loss w.r.t. the logits is zero wherever the target is not a response token, and swapping
    the pad ids for other tokens changes nothing."""
    model = tiny_model(tok, seed=2)
    ids, mask = dpo.pair_batch(encoded(tok), tok.pad_id)
    logits = model(ids).detach().requires_grad_(True)
    logp = torch.gather(logits[:, :-1].log_softmax(-1), -1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    c, r = logp.sum(-1).chunk(2)
    losses, *_ = dpo.preference_loss(c, r, c.detach() - 0.3, r.detach() + 0.2, beta=0.1)
    losses.mean().backward()
    grad_rows = logits.grad[:, :-1].abs().sum(-1)  # (2B, T-1): position t predicts token t+1
    assert (grad_rows[mask[:, 1:] == 0] == 0).all()
    assert (grad_rows[mask[:, 1:] == 1] > 0).all()
    # padding: right-padded rows see no pad token, so other ids there change nothing
    with torch.no_grad():
        other = ids.masked_fill((ids == tok.pad_id) & (torch.cumsum(mask.flip(1), 1).flip(1) == 0), 7)
        assert not torch.equal(other, ids)
        torch.testing.assert_close(torch.stack(dpo.response_logps(model, other, mask)),
                                   torch.stack(dpo.response_logps(model, ids, mask)))


def test_one_step_raises_the_chosen_over_rejected_margin(tok):
    """One SGD step on the DPO loss raises log π(y_w) - log π(y_l) on a toy pair."""
    model = tiny_model(tok, seed=3)
    pairs = encoded(tok)[:1]
    ids, mask = dpo.pair_batch(pairs, tok.pad_id)
    with torch.no_grad():
        ref_c, ref_r = dpo.response_logps(model.eval(), ids, mask)
    before = (ref_c - ref_r).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    c, r = dpo.response_logps(model, ids, mask)
    losses, *_ = dpo.preference_loss(c, r, ref_c, ref_r, beta=0.1)
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        c, r = dpo.response_logps(model, ids, mask)
    assert (c - r).item() > before + 0.1


def test_precomputed_and_live_reference_give_the_same_loss_and_gradients(tok):
    """The precomputed log π_ref equals a live frozen copy's: same loss, same gradients."""
    import copy

    pairs = encoded(tok)
    start = tiny_model(tok, seed=4).eval()
    dpo.reference_logps(start, pairs, tok.pad_id, torch.device("cpu"))
    policy = copy.deepcopy(start)
    with torch.no_grad():  # move the policy away from the reference, so h != 0
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids, mask = dpo.pair_batch(pairs, tok.pad_id)
    out = []
    for live in (False, True):
        policy.zero_grad()
        c, r = dpo.response_logps(policy, ids, mask)
        if live:
            with torch.no_grad():
                rc, rr = dpo.response_logps(start, ids, mask)
        else:
            rc = torch.tensor([p["ref_chosen"] for p in pairs])
            rr = torch.tensor([p["ref_rejected"] for p in pairs])
        loss = dpo.preference_loss(c, r, rc, rr, beta=0.1)[0].mean()
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in policy.parameters()]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6) and out[0][0] != pytest.approx(math.log(2))
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# Data


def test_a_pair_that_does_not_fit_is_dropped_and_counted(tok, capsys):
    """A pair whose prompt + longer response exceeds the context is dropped (never cut) and counted."""
    long_reject = Preference(PREFS[0].prompt, PREFS[0].chosen, "Sorted: " + " ".join("9" * 120))
    kept = dpo.encode_pairs(tok, PREFS + [long_reject], 96, "train")
    assert len(kept) == 3
    assert kept[0]["prompt"] == encode_prompt(tok, PREFS[0].prompt)
    assert kept[0]["chosen"] == encode_response(tok, PREFS[0].chosen)
    assert "dropped 1 of 4" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    """A tiny pretrained checkpoint (sft.py's pretraining, 3 steps)."""
    out = tmp_path_factory.mktemp("m0")
    cfg = sft.SFTConfig(mode="pretrain", out_dir=str(out), vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2,
                        n_kv_heads=2, max_seq_len=128, batch_size=4, seq_len=32, max_steps=3, warmup_steps=1,
                        eval_every=0, corpus_docs=200, device="cpu", dropout=0.0)
    return sft.main(cfg)


def write_prefs(path, n=24, bad_line=None):
    rows = [json.dumps({"prompt": t.prompt, "chosen": t.gold, "rejected": tasks.corrupt(t, __import__("random").Random(i), "no_answer")})
            for i, t in enumerate(tasks.eval_prompts(5, n))]
    if bad_line:
        rows[bad_line - 1] = '{"prompt": "x", "chosen": "y"}'
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def dpo_cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), batch_size=4, max_steps=4, eval_every=2, warmup_steps=1, lr=1e-3,
                device="cpu", eval_frac=0.2)
    base.update(kw)
    return dpo.DPOConfig(**base)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_malformed_preference_line_fails_before_training(m0, tmp_path, monkeypatch):
    """A bad line names file:line, before any model is loaded or anything written."""
    path = write_prefs(tmp_path / "p.jsonl", bad_line=5)
    monkeypatch.setattr(dpo, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded before data check"))
    cfg = dpo_cfg(tmp_path / "out", init=m0, data=path)
    with pytest.raises(DataError, match=rf"{path}:5:"):
        dpo.main(cfg)
    assert not os.path.exists(cfg.out_dir)


def test_end_to_end_metrics_and_exact_resume(m0, tmp_path, monkeypatch):
    """A tiny run logs every metric each step (eval ones at the eval steps, starting at 50%
    accuracy and ln 2 loss before training moves anything); a run stopped after step 2 and
    resumed ends with the same weights as an uninterrupted one."""
    path = write_prefs(tmp_path / "p.jsonl")
    a = dpo.main(dpo_cfg(tmp_path / "a", init=m0, data=path, save_every=2))
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for k in ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
              "rejected_logp", "grad_norm", "lr"):
        assert all(math.isfinite(r[k]) for r in rows), k
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1 sees policy = reference
    assert "eval_reward_accuracy" in rows[1] and "eval_margin" in rows[3]

    real = train_utils.OutDir.save

    def save_then_crash(self, model, tok_, opt, step, *args, **kwargs):
        real(self, model, tok_, opt, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    cfg_b = dpo_cfg(tmp_path / "b", init=m0, data=path, save_every=2)
    with monkeypatch.context() as m:
        m.setattr(train_utils.OutDir, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            dpo.main(cfg_b)
    b = dpo.main(dataclasses.replace(cfg_b, resume=True))
    wa, wb = (Transformer.from_pretrained(p).state_dict() for p in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]


def test_world_pairs_are_oracle_ranked_and_saved(m0, tmp_path, monkeypatch):
    """--world_prompts samples two responses per training prompt from --init and keeps the pairs
    the oracle ranks, chosen = higher points; a prompt whose samples tie, or with a sample cut
    off by the budget (no EOS), gives none. The pairs are saved for --resume."""
    import sampling

    def fake(model, tok, prompts, n, *a, **k):  # per prompt: gold vs wrong, a tie, or an unfinished one
        out, ended = [], []
        for i, p in enumerate(prompts):
            task = tasks.parse_task(p)
            out.append([task.gold, "I do not know."] if i % 3 == 0 else [task.gold, task.gold] if i % 3 == 1
                       else ["I do not know.", task.gold[:-3]])
            ended.append([True, True] if i % 3 < 2 else [True, False])
        return out, ended

    monkeypatch.setattr(sampling, "sample_responses", fake)
    cfg = dpo_cfg(tmp_path / "w", init=m0, world_prompts=30, n_eval=0, max_steps=1, batch_size=2)
    dpo.main(cfg)
    with open(os.path.join(cfg.out_dir, "world_pairs.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert len(rows) == 10  # every third prompt: the ties and the unfinished give no pair
    for r in rows:
        task = tasks.parse_task(r["prompt"])
        assert task is not None and not tasks.is_heldout(task)
        pc, pr = (tasks.grade(task, x).points for x in (r["chosen"], r["rejected"]))
        assert [pc, pr] == r["points"] and pc > pr and r["chosen"] == task.gold


def test_data_and_world_pairs_are_exclusive(m0, tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        dpo.main(dpo_cfg(tmp_path / "x", init=m0))


def test_nll_term_adds_the_chosen_per_token_nll(m0, tmp_path, monkeypatch):
    """--nll_coef α adds α · (-log π(y_w|x) / |y_w|) per pair (Pang et al. 2024): at step 1
    (policy = reference) the logged loss is ln 2 + α · the chosen response's mean token NLL,
    computed here from the model directly."""
    from data import load_tokenizer

    path = write_prefs(tmp_path / "p.jsonl")
    cfg = dpo_cfg(tmp_path / "n", init=m0, data=path, nll_coef=0.5, max_steps=1, batch_size=24, eval_frac=0.0)
    dpo.main(cfg)
    row = read_metrics(cfg.out_dir)[0]
    tok, model = load_tokenizer(m0), Transformer.from_pretrained(m0).eval()
    prefs = dpo.encode_pairs(tok, dpo.load_preference_data(path), 128, "x")
    with torch.no_grad():
        ids, mask = dpo.pair_batch(prefs, tok.pad_id)
        chosen, _ = dpo.response_logps(model, ids, mask)
    nll = (-chosen / torch.tensor([len(p["chosen"]) for p in prefs])).mean().item()
    assert row["nll"] == pytest.approx(nll, rel=1e-4)
    assert row["loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)

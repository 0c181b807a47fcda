"""Tests for reward.py: the K-choose-2 loss against a brute-force loop, the score read at the
last real token under left and right padding, the normalisation, the head's init, save/load
(and the HF layout it documents), the comparison readers, and tiny end-to-end runs (world
comparisons ranked by the oracle, a ranked-list file, exact --resume)."""

import dataclasses
import itertools
import json
import math
import os

import pytest
import torch

import data
import reward
import train_utils
import sft
import tasks
from data import DataError, UserError, encode_prompt, encode_response, pad_batch, train_tokenizer
from model import ModelConfig, Transformer

VOCAB = 300
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    texts = [p + "\n" + r for p, r in tasks.ift_seed(1, 200)]
    return train_tokenizer(texts, VOCAB)


def tiny_rm(tok, seed=0, dim=32):
    torch.manual_seed(seed)
    trunk = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=2, n_heads=2, n_kv_heads=2,
                                    max_seq_len=96, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                    pad_token_id=tok.pad_id))
    with torch.no_grad():  # larger weights: scores that differ clearly between sequences
        for p in trunk.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return reward.RewardModel(trunk).eval()


def sequences(tok):
    items = [("Sort these numbers in ascending order: 5 3 9", "Sorted: 3 5 9."),
             ("What is 12 plus 30?", "The sum is 42."),
             ("Repeat the word cat 3 times.", "Repeated: cat cat cat. I hope this helps, it was fun."),
             ("Reverse this list: 4 1", "1 4")]
    return [encode_prompt(tok, p) + encode_response(tok, r) for p, r in items]


# -----------------------------------------------------------------------------
# The loss


def test_comparison_loss_equals_a_brute_force_loop_over_pairs():
    """Three prompts with K = 4, 3, 5 responses (one with a tie): the loss is the mean over
    prompts of -mean over that prompt's ordered pairs of log σ(r_w - r_l), written as loops."""
    torch.manual_seed(0)
    scores = [[3, 1, 2, 0], [1, 1, 0], [0, 4, 2, 3, 1]]  # ranking values; 1 == 1 is a tie (no pair)
    groups = [{"prompt": [1], "responses": [[2]] * len(s), "pairs": data.from_scores("p", ["x"] * len(s), s).pairs,
               "scores": s} for s in scores]
    _, _, win, lose, group = reward.comparison_batch(groups, pad_id=0)
    rewards = torch.randn(sum(len(s) for s in scores)) * 2
    loss, acc = reward.comparison_loss(rewards, win, lose, group, len(groups))

    want, offset, right, total = [], 0, 0, 0
    for s in scores:
        terms = []
        for i, j in itertools.combinations(range(len(s)), 2):
            if s[i] == s[j]:
                continue
            w, l = (i, j) if s[i] > s[j] else (j, i)
            diff = (rewards[offset + w] - rewards[offset + l]).item()
            terms.append(-math.log(1 / (1 + math.exp(-diff))))
            right += diff > 0
            total += 1
        want.append(sum(terms) / len(terms))
        offset += len(s)
    assert [len(g["pairs"]) for g in groups] == [math.comb(4, 2), math.comb(3, 2) - 1, math.comb(5, 2)]
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert acc.item() == pytest.approx(right / total)


def test_one_step_on_the_loss_raises_the_preferred_response(tok):
    """A gradient step on one prompt's comparisons moves the RM towards the ranking: the score
    margin of the best over the worst response grows, and the bias-free loss is finite for
    huge margins (logsigmoid, not log of sigmoid)."""
    rm = tiny_rm(tok, seed=1)
    seqs = sequences(tok)[:3]
    groups = [{"prompt": [], "responses": seqs, "pairs": [(0, 1), (0, 2), (1, 2)], "scores": None}]
    ids, attn, win, lose, group = reward.comparison_batch(groups, tok.pad_id)
    before = rm.reward(ids, attn).detach()
    opt = torch.optim.SGD(rm.parameters(), lr=0.1)
    loss, _ = reward.comparison_loss(rm.reward(ids, attn), win, lose, group, 1)
    loss.backward()
    opt.step()
    after = rm.reward(ids, attn).detach()
    assert (after[0] - after[2]) > (before[0] - before[2])
    huge, _ = reward.comparison_loss(torch.tensor([0.0, 500.0]), torch.tensor([0]), torch.tensor([1]),
                                     torch.tensor([0]), 1)
    assert huge.item() == pytest.approx(500.0)


# -----------------------------------------------------------------------------
# The model


def test_last_token_index_under_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert reward.last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_score_is_read_at_the_last_real_token_under_left_and_right_padding(tok):
    """Each sequence scored alone equals its score in a right-padded and in a left-padded batch,
    and equals the head applied to the hidden state of its LAST token (its EOS); what the pad
    positions hold changes nothing."""
    rm = tiny_rm(tok, seed=2)
    seqs = sequences(tok)
    with torch.no_grad():
        alone = torch.stack([rm.reward(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
        for side in ("right", "left"):
            ids, attn = pad_batch(seqs, tok.pad_id, side)
            torch.testing.assert_close(rm.reward(ids, attn), alone, atol=1e-5, rtol=1e-5)
            junk = ids.masked_fill(attn == 0, 7)
            torch.testing.assert_close(rm.reward(junk, attn), alone, atol=1e-5, rtol=1e-5)
        s = seqs[0]
        h = rm.transformer(torch.tensor([s]), return_hidden=True)[0]  # (T, dim)
        assert rm.reward(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() == pytest.approx(
            (h[-1] @ rm.score.weight[0]).item(), abs=1e-5)
        assert s[-1] == tok.eos_id
        # not the first token, not the second-to-last: those give other numbers
        assert abs((h[-2] @ rm.score.weight[0]).item() - alone[0].item()) > 1e-3


def test_head_init_std_and_zero_head(tok):
    """The head starts with std 1/sqrt(d+1) (initial scores about unit scale; the trunk's
    default 0.02 would start them near 0), and --value_init zero means exactly zero."""
    torch.manual_seed(0)
    trunk = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=1024, n_layers=1, n_heads=4, n_kv_heads=4,
                                    max_seq_len=32))
    w = reward.RewardModel(trunk).score.weight
    assert w.shape == (1, 1024)
    assert w.std().item() == pytest.approx(1 / math.sqrt(1025), rel=0.1)
    assert reward.RewardModel(trunk, head="zero").score.weight.abs().max() == 0


def test_normalisation_gives_mean_0_std_1_on_its_reference_set(tok):
    """After fit_normalisation the reference sequences score mean 0 and std 1, whatever the batch
    size they are scored in; the ranking is unchanged (gain > 0)."""
    rm = tiny_rm(tok, seed=3)
    seqs = sequences(tok) * 3 + [s[:-3] + [tok.eos_id] for s in sequences(tok)]
    raw = reward.score_sequences(rm, seqs, tok.pad_id, CPU)
    info = reward.fit_normalisation(rm, seqs, tok.pad_id, CPU)
    assert info["raw_mean"] == pytest.approx(raw.mean().item(), abs=1e-5)
    for bs in (64, 3):
        z = reward.score_sequences(rm, seqs, tok.pad_id, CPU, batch_size=bs)
        assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
        # an increasing affine map of the raw score: the ranking is unchanged
        torch.testing.assert_close(z, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_head_and_normalisation(tok, tmp_path):
    rm = tiny_rm(tok, seed=4)
    reward.fit_normalisation(rm, sequences(tok), tok.pad_id, CPU)
    rm.save_pretrained(str(tmp_path / "rm"), tok)
    loaded, _ = reward.load_reward_model(str(tmp_path / "rm"))
    ids, attn = pad_batch(sequences(tok), tok.pad_id, "left")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().reward(ids, attn), rm.reward(ids, attn))
    assert json.loads((tmp_path / "rm" / "reward.json").read_text())["gain"] == pytest.approx(rm.gain.item())
    with pytest.raises(UserError, match="is not a reward model"):
        Transformer.save_pretrained(rm.transformer, str(tmp_path / "lm"), tok)
        reward.load_reward_model(str(tmp_path / "lm"))


def test_hf_sequence_classification_gives_the_same_scores(tok, tmp_path):
    """The mapping the docstring documents: transformers' LlamaForSequenceClassification with our
    score.weight gives the raw score; gain * raw + bias is ours (left padding included)."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import LlamaForSequenceClassification

    rm = tiny_rm(tok, seed=5)
    reward.fit_normalisation(rm, sequences(tok), tok.pad_id, CPU)
    rm.save_pretrained(str(tmp_path / "rm"), tok)
    hf = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "rm"), num_labels=1).eval()
    hf.score.weight.data = load_file(str(tmp_path / "rm" / "score.safetensors"))["score.weight"]
    norm = json.loads((tmp_path / "rm" / "reward.json").read_text())
    ids, attn = pad_batch(sequences(tok), tok.pad_id, "left")
    with torch.no_grad():
        theirs = norm["gain"] * hf(input_ids=ids, attention_mask=attn).logits[:, 0] + norm["bias"]
        torch.testing.assert_close(theirs, rm.reward(ids, attn), atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# Comparison data


def test_ranked_lists_pairs_and_errors(tmp_path):
    """A ranked list gives all C(K,2) pairs, best first; with scores, ties give none; preference
    pairs of one prompt are grouped into one comparison; a bad line names file:line."""
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"]}) + "\n"
                      + json.dumps({"prompt": "q", "responses": ["x", "y", "z"], "scores": [1, 3, 1]}) + "\n")
    a, b = data.load_comparisons(str(ranked))
    assert sorted(a.pairs) == [(0, 1), (0, 2), (1, 2)]
    assert sorted(b.pairs) == [(1, 0), (1, 2)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "q", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]) + "\n")
    p, q = data.load_comparisons(str(pairs))
    assert (p.responses, p.pairs) == (["a", "b", "c"], [(0, 1), (0, 2)])
    assert (q.responses, q.pairs) == (["x", "y"], [(0, 1)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "p", "responses": ["a", "a"]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: .*same text twice"):
        data.load_comparisons(str(bad))
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: 'scores'"):
        data.load_comparisons(str(bad))


def test_real_hh_transcripts_become_comparisons():
    """Anthropic HH (../shared/data, when present): one pair per line whose two sides differ; a
    conversation that appears on several lines keeps its pairs together in one comparison."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh_rlhf_harmless_base_test.jsonl")
    if not os.path.exists(path):
        pytest.skip("../shared/data is absent")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    comps = data.load_comparisons(path)
    assert sum(len(c.pairs) for c in comps) == sum(r["chosen"] != r["rejected"] for r in rows)
    assert len(comps) < len(rows)
    for c in comps:
        assert all(w != l and max(w, l) < len(c.responses) for w, l in c.pairs)


# -----------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny SFT checkpoint (pretraining 3 steps, then SFT 100 steps): it ends most replies
    with EOS and the oracle gives its replies different points, so comparisons exist."""
    out = tmp_path_factory.mktemp("sft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's one-thread fixture is per test: it has not run yet here
    base = dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=128, batch_size=16,
                seq_len=32, warmup_steps=2, eval_every=0, corpus_docs=200, device="cpu", show_example=False,
                dropout=0.0)
    try:
        m0 = sft.main(sft.SFTConfig(mode="pretrain", out_dir=str(out / "m0"), max_steps=3, **base))
        return sft.main(sft.SFTConfig(mode="sft", init=m0, out_dir=str(out / "sft"), max_steps=100, lr=3e-3,
                                      n_ift=200, n_eft=0, **base))
    finally:
        torch.set_num_threads(threads)


def rm_cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), batch_size=2, eval_every=2, warmup_steps=1, lr=1e-3, device="cpu",
                max_new_tokens=24, n_norm=16, n_eval=8, n_eft_eval=4, k=3)
    base.update(kw)
    return reward.RewardConfig(**base)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_world_comparisons_are_oracle_ranked_and_the_model_is_normalised(sft_model, tmp_path):
    """--world_prompts: K samples per training prompt, ranked by the oracle (scores = points,
    a pair only between different points, no held-out prompt; the pairwise accuracy is measured
    on held-out prompts only); the saved model reloads with its
    normalisation, under which the saved SFT responses score mean 0 and std 1."""
    cfg = rm_cfg(tmp_path / "w", init=sft_model, world_prompts=48, max_steps=3)
    ckpt = reward.main(cfg)
    rows = read_jsonl(os.path.join(cfg.out_dir, "comparisons.jsonl"))
    assert len(rows) >= 2
    for r in rows:
        task = tasks.parse_task(r["prompt"])
        assert task is not None and not tasks.is_heldout(task)
        assert r["scores"] == [tasks.grade(task, x).points for x in r["responses"]]
        assert len(set(r["scores"])) >= 2
    held = read_jsonl(os.path.join(cfg.out_dir, "eval_comparisons.jsonl"))
    assert held and all(tasks.is_heldout(tasks.parse_task(r["prompt"])) for r in held)
    evals = json.load(open(os.path.join(cfg.out_dir, "rm_eval.json")))
    assert 0 <= evals["eft_eval"]["pairwise_accuracy"] <= 100
    rm, tok = reward.load_reward_model(ckpt)
    norm = read_jsonl(os.path.join(cfg.out_dir, "norm_responses.jsonl"))
    z = reward.score_sequences(rm.eval(), [encode_prompt(tok, r["prompt"]) + encode_response(tok, r["response"])
                                           for r in norm], tok.pad_id, CPU)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert [r["step"] for r in read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))] == [1, 2, 3]


def write_ranked(path, n=30):
    import random

    rng = random.Random(0)
    rows = []
    for t in tasks.eval_prompts(5, n):
        responses = list(dict.fromkeys(tasks.corrupt(t, rng, k) for k in ("gold", "partly_wrong", "no_answer")))
        rows.append(json.dumps({"prompt": t.prompt, "responses": responses}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_ranked_file_run_logs_metrics_and_resumes_exactly(sft_model, tmp_path, monkeypatch):
    """--data with ranked lists: every step logs loss and accuracy, eval rows the held-out
    accuracy; a run stopped after step 2 and resumed ends with the same weights, head and
    normalisation as an uninterrupted one."""
    data = write_ranked(tmp_path / "ranked.jsonl")
    a = reward.main(rm_cfg(tmp_path / "a", init=sft_model, data=data, max_steps=4, save_every=2, eval_frac=0.2))
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert "eval_accuracy" in rows[1] and "eval_accuracy" in rows[3]

    real = train_utils.OutDir.save

    def save_then_crash(self, model, tok_, opt, step, *args, **kwargs):
        real(self, model, tok_, opt, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    cfg_b = rm_cfg(tmp_path / "b", init=sft_model, data=data, max_steps=4, save_every=2, eval_frac=0.2)
    with monkeypatch.context() as m:
        m.setattr(train_utils.OutDir, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            reward.main(cfg_b)
    b = reward.main(dataclasses.replace(cfg_b, resume=True))
    ra, rb = reward.load_reward_model(a)[0], reward.load_reward_model(b)[0]
    for (k, va), vb in zip(ra.state_dict().items(), rb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_flags_are_checked_before_anything_is_written(sft_model, tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        reward.main(rm_cfg(tmp_path / "x", init=sft_model))
    with pytest.raises(UserError, match="--k"):
        rm_cfg(tmp_path / "x", init=sft_model, world_prompts=4, k=1)
    assert not os.path.exists(tmp_path / "x")

"""Tests for sft.py: the masked SFT loss, the lr schedule, --resume, data validation order,
example filtering, checkpoints and the world corpus.

Everything is tiny (vocab ~300, dim 32, <= 2 layers, a handful of steps) so the file runs in
a few seconds on a shared 2-core CPU.
"""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import sft
import train_utils
import tasks
from data import DataError, UserError, encode_chat, encode_prompt, encode_response, load_tokenizer, pad_batch, train_tokenizer
from model import ModelConfig, Transformer
from train_utils import lr_schedule

VOCAB = 300




# -----------------------------------------------------------------------------
# Helpers and fixtures


@pytest.fixture(scope="module")
def tok():
    texts = [p + "\n" + r for p, r in tasks.ift_seed(1, 200)]
    texts += [d if isinstance(d, str) else d[0] + "\n" + d[1] for d in tasks.pretrain_corpus(0, 100)]
    return train_tokenizer(texts, VOCAB)


def tiny_model(tok, seed=0, dropout=0.0, max_seq_len=128):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(
        vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=max_seq_len,
        dropout=dropout, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))


PAIRS = [
    ("Sort these numbers: 5 3 9 1", "Sorted: 1 3 5 9."),
    ("Compute 12 + 7.", "The sum is 19."),
    ("Reverse this list: cat dog egg hat pen", "Reversed: pen hat egg dog cat."),
]


def tiny_cfg(out_dir, **kw) -> sft.SFTConfig:
    base = dict(out_dir=str(out_dir), vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                max_seq_len=128, batch_size=4, seq_len=32, max_steps=3, warmup_steps=1, eval_every=0,
                eval_batches=2, corpus_docs=200, device="cpu", show_example=False, dropout=0.0)
    base.update(kw)
    return sft.SFTConfig(**base)


def write_sft_jsonl(path, n=12, bad_line=None, bad_text=None):
    rows = [json.dumps({"prompt": p, "response": r}) for p, r in tasks.ift_seed(7, n)]
    if bad_line is not None:
        rows[bad_line - 1] = bad_text
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    """A pretrained checkpoint made by sft.main itself (pretrain mode, 3 steps)."""
    out = tmp_path_factory.mktemp("m0")
    cfg = tiny_cfg(out, mode="pretrain", n_layers=2)
    ckpt = sft.main(cfg)
    return cfg, ckpt


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_sft_jsonl(tmp_path_factory.mktemp("data") / "demos.jsonl")


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "model.safetensors"))


# -----------------------------------------------------------------------------
# The SFT loss


def _batch(tok):
    chats = [encode_chat(tok, p, r) for p, r in PAIRS]
    ids, attn, lm = pad_batch([c[0] for c in chats], tok.pad_id, "right", [c[1] for c in chats])
    # supervised token columns, from the template pieces (not from the mask under test)
    spans = [(len(encode_prompt(tok, p)), len(encode_prompt(tok, p)) + len(encode_response(tok, r))) for p, r in PAIRS]
    return ids, attn, lm, spans


def test_lm_loss_is_mean_ce_over_response_and_eos_targets(tok):
    """lm_loss = mean next-token CE over exactly the reply+EOS target columns of all rows (one-token shift)."""
    model = tiny_model(tok).eval()
    ids, attn, lm, spans = _batch(tok)
    assert len({e - s for s, e in spans}) > 1 and ids.shape[1] > min(e for _, e in spans)  # uneven rows, real padding
    with torch.no_grad():
        loss = sft.lm_loss(model, ids, attn, lm)
        logits = model(ids, attention_mask=attn).float()
    terms = []
    for b, (start, end) in enumerate(spans):
        for t in range(start, end):  # target column t is predicted by the logits at column t-1
            terms.append(F.cross_entropy(logits[b, t - 1][None], ids[b, t][None]))
    assert ids[0, spans[0][1] - 1].item() == tok.eos_id  # EOS is the last supervised target
    expected = torch.stack(terms).mean()
    assert len(terms) == sum(e - s for s, e in spans)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_lm_loss_gradient_is_zero_at_prompt_and_pad_predictions(tok):
    """The loss ignores prompt/pad targets: d loss / d logits is zero at every column whose next token is unsupervised."""

    class Capture(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.logits = m, None

        def forward(self, idx, attention_mask=None):
            out = self.m(idx, attention_mask=attention_mask)
            out.retain_grad()
            self.logits = out
            return out

    cap = Capture(tiny_model(tok).eval())
    ids, attn, lm, spans = _batch(tok)
    sft.lm_loss(cap, ids, attn, lm).backward()
    g = cap.logits.grad  # (B, T, V)
    T = ids.shape[1]
    for b, (start, end) in enumerate(spans):
        for c in range(T):
            supervised = start <= c + 1 < end
            norm = g[b, c].abs().sum().item()
            if supervised:
                assert norm > 0, (b, c)
            else:
                assert norm == 0, (b, c)


def test_sft_steps_reduce_loss_on_a_fixed_batch(tok):
    """20 AdamW steps of lm_loss on one batch at least halve the loss (the loss is trainable end to end)."""
    model = tiny_model(tok).train()
    ids, attn, lm, _ = _batch(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = sft.lm_loss(model, ids, None, lm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = sft.lm_loss(model.eval(), ids, attn, lm).item()
    assert final < 0.5 * losses[0], (losses[0], final)


# -----------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_schedule_linear_warmup_then_linear_decay_to_min_lr():
    """lr_schedule: linear warm-up lr/W .. lr over steps 0..W-1, then linear decay reaching
    lr * min_lr_ratio at max_steps (clamped)."""
    lr, lo, W, N = 1e-3, 1e-4, 10, 50

    def at(s, warmup=W):
        return lr_schedule(s, lr, lo / lr, warmup, N)

    for s in range(W):
        assert at(s) == pytest.approx(lr * (s + 1) / W)
    assert at(W - 1) == pytest.approx(lr)
    for s in range(W, N + 1):
        assert at(s) == pytest.approx(lr - (lr - lo) * (s - W) / (N - W))
    assert at(N) == pytest.approx(lo)
    assert at(N + 7) == pytest.approx(lo)  # never below min_lr
    decay = [at(s) for s in range(W, N + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # no warm-up: full lr at step 0
    assert at(0, warmup=0) == pytest.approx(lr)
    assert at(N, warmup=0) == pytest.approx(lo)


# -----------------------------------------------------------------------------
# --resume


class _Crash(Exception):
    pass


def _run_interrupted(cfg, at_step, monkeypatch):
    """Run sft.main and 'crash' right after the checkpoint of step `at_step` is written."""
    real_save = train_utils.OutDir.save

    def save_then_crash(self, model, tok_, optimizer, step, *args, **kwargs):
        real_save(self, model, tok_, optimizer, step, *args, **kwargs)
        if step == at_step:
            raise _Crash

    with monkeypatch.context() as m:
        m.setattr(train_utils.OutDir, "save", save_then_crash)
        with pytest.raises(_Crash):
            sft.main(cfg)


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
@pytest.mark.parametrize("how", ["crash", "extend"])
def test_resume_reproduces_the_uninterrupted_run(mode, how, m0, sft_data, tmp_path, monkeypatch):
    """A run stopped at N/2 and resumed gives bit-identical weights and continues metrics.jsonl at step N/2+1 (dropout on)."""
    N, half = 6, 3
    kw = dict(mode=mode, max_steps=N, save_every=half, dropout=0.1, eval_every=2, lr=3e-3, min_lr_ratio=0.1,
              warmup_steps=2 if how == "crash" else N)  # "extend": lr schedule independent of max_steps
    if mode == "sft":
        kw.update(init=m0[1], data=sft_data)
    cfg_a = tiny_cfg(tmp_path / "a", **kw)
    cfg_b = tiny_cfg(tmp_path / "b", **kw)

    ckpt_a = sft.main(cfg_a)
    if how == "crash":
        _run_interrupted(cfg_b, half, monkeypatch)
    else:  # the first leg is a complete run of N/2 steps, then --resume --max_steps N
        sft.main(dataclasses.replace(cfg_b, max_steps=half))
    assert [r["step"] for r in read_metrics(cfg_b.out_dir)] == list(range(1, half + 1))
    ckpt_b = sft.main(dataclasses.replace(cfg_b, resume=True))

    wa, wb = load_weights(ckpt_a), load_weights(ckpt_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume (max diff {(wa[k] - wb[k]).abs().max():.3g})"
    ma, mb = read_metrics(cfg_a.out_dir), read_metrics(cfg_b.out_dir)
    assert [r["step"] for r in mb] == list(range(1, N + 1))
    for ra, rb in zip(ma, mb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"])
    state = torch.load(os.path.join(ckpt_b, "trainer_state.pt"), weights_only=True)
    assert state["step"] == N


def test_resume_after_crash_between_checkpoints_keeps_metrics_consistent(m0, sft_data, tmp_path, monkeypatch):
    """A crash after step 4 (last checkpoint at 3) then --resume: metrics.jsonl has each step 1..N once, no stale rows."""
    N, half = 6, 3
    cfg = tiny_cfg(tmp_path / "b", mode="sft", init=m0[1], data=sft_data, max_steps=N, save_every=half)
    def crash_in_step_5(step, *a):  # step 4 finished and logged, no checkpoint since step 3
        if step == half + 1:
            raise _Crash
        return lr_schedule(step, *a)

    with monkeypatch.context() as m:
        m.setattr(sft, "lr_schedule", crash_in_step_5)
        with pytest.raises(_Crash):
            sft.main(cfg)
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == list(range(1, half + 2))
    assert torch.load(os.path.join(cfg.out_dir, "model", "trainer_state.pt"), weights_only=True)["step"] == half
    sft.main(dataclasses.replace(cfg, resume=True))
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == list(range(1, N + 1))


def test_resume_without_checkpoint_errors_clearly(m0, sft_data, tmp_path):
    """--resume with no checkpoint in out_dir raises a UserError naming --resume (pretrain and sft)."""
    cfg = tiny_cfg(tmp_path / "p", mode="pretrain", corpus_docs=50, resume=True)
    with pytest.raises(UserError, match="--resume"):
        sft.main(cfg)
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))
    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=m0[1], data=sft_data, resume=True)
    with pytest.raises(UserError, match="--resume"):
        sft.main(cfg)
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))


def test_sft_without_init_errors_clearly(sft_data, tmp_path):
    """sft mode with no --init raises a ValueError that names --init, and writes no checkpoint."""
    cfg = tiny_cfg(tmp_path / "s", mode="sft", data=sft_data, init="")
    with pytest.raises(ValueError, match="--init"):
        sft.main(cfg)
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))


# -----------------------------------------------------------------------------
# --data validation happens first


@pytest.mark.parametrize("bad", ['{"prompt": "Compute 1 + 2."', '{"prompt": "Compute 1 + 2."}',
                                 '{"prompt": "Compute 1 + 2.", "response": 3}'],
                         ids=["invalid-json", "missing-field", "wrong-type"])
def test_bad_jsonl_line_fails_with_file_line_before_any_model(bad, m0, tmp_path, monkeypatch):
    """A bad --data line raises DataError 'file:line:' before a tokenizer/model is loaded or a checkpoint is written."""
    path = write_sft_jsonl(tmp_path / "bad.jsonl", n=8, bad_line=5, bad_text=bad)

    def no_model(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the data were validated")

    monkeypatch.setattr(sft, "load_checkpoint", no_model)
    monkeypatch.setattr(sft.Transformer, "from_pretrained", no_model)
    monkeypatch.setattr(sft, "Transformer", no_model)
    cfg = tiny_cfg(tmp_path / "out", mode="sft", init=m0[1], data=path)
    with pytest.raises(DataError) as e:
        sft.main(cfg)
    assert str(e.value).startswith(f"{path}:5:")
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))


# -----------------------------------------------------------------------------
# Example filtering


def test_encode_examples_drops_and_counts_long_examples_never_cuts(tok, capsys):
    """encode_examples keeps fitting examples unchanged (boundary len == max_len kept), drops longer ones and reports the count."""
    short = PAIRS[1]
    fit = PAIRS[2]
    max_len = len(encode_chat(tok, *fit)[0])
    over_by_one = (fit[0] + "7", fit[1])  # digits are single tokens: one more token than `fit`
    assert len(encode_chat(tok, *over_by_one)[0]) == max_len + 1
    very_long = ("Sort: " + " ".join(str(i % 10) for i in range(200)), "Sorted.")
    pairs = [short, very_long, fit, over_by_one]
    kept = sft.encode_examples(tok, pairs, max_len, "train")
    assert kept == [encode_chat(tok, *short), encode_chat(tok, *fit)]  # whole examples, masks included
    out = capsys.readouterr().out
    assert "dropped 2 of 4" in out
    with pytest.raises(ValueError, match="no example fits"):
        sft.encode_examples(tok, [very_long, over_by_one], max_len, "train")


def test_sft_runs_when_the_only_held_out_example_is_too_long(m0, tmp_path):
    """One over-long example in a --data file is dropped, wherever the shuffle puts it (here: the eval split)."""
    rows = [{"prompt": p, "response": r} for p, r in tasks.ift_seed(7, 11)]
    long_prompt = "Sort these: " + " ".join(str(i % 10) for i in range(150))
    rows.append({"prompt": long_prompt, "response": "Sorted."})
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    seed = next(s for s in range(200) if sft.file_examples(str(path), 0.05, s)[1][0][0] == long_prompt)
    cfg = tiny_cfg(tmp_path / "out", mode="sft", init=m0[1], data=str(path), seed=seed, max_steps=1, eval_every=1)
    ckpt = sft.main(cfg)  # training data (11 examples) are fine; the eval loss can fall back to training examples
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors"))
    assert math.isfinite(read_metrics(cfg.out_dir)[-1]["eval_loss"])


# -----------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_layout_and_loading(m0, sft_data, tok, tmp_path):
    """sft.main writes model.safetensors, config.json, tokenizer.json, train_config.json (resolved cfg), trainer_state.pt; all reload."""
    cfg_sft = tiny_cfg(tmp_path / "m1", mode="sft", init=m0[1], data=sft_data, max_steps=2, eval_every=1)
    ckpt_sft = sft.main(cfg_sft)
    assert ckpt_sft == os.path.join(cfg_sft.out_dir, "model")
    for cfg, ckpt in [m0, (cfg_sft, ckpt_sft)]:
        for name in ["model.safetensors", "config.json", "tokenizer.json", "train_config.json", "trainer_state.pt"]:
            assert os.path.isfile(os.path.join(ckpt, name)), name
        with open(os.path.join(ckpt, "train_config.json")) as f:
            saved = json.load(f)  # the resolved config, and the digests of the input files
        assert {k: v for k, v in saved.items() if k not in ("_inputs", "_ranks")} == dataclasses.asdict(cfg)
        assert saved["_ranks"] == 1  # one process: no torchrun
        assert set(saved["_inputs"]) == ({"--init", "--data"} if cfg.init else set())
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
        assert state["step"] == cfg.max_steps
        assert len(state["optimizer"]["state"]) > 0
        model = Transformer.from_pretrained(ckpt)
        t = load_tokenizer(ckpt)
        assert model.config.vocab_size == t.vocab_size
        assert (model.config.eos_token_id, model.config.bos_token_id) == (t.eos_id, t.bos_id)
        assert model.config.dim == 32 and model.config.n_layers == 2
        ids = torch.tensor([encode_prompt(t, "Compute 1 + 2.")])
        assert torch.isfinite(model(ids)).all()
        rows = read_metrics(cfg.out_dir)
        assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    # the SFT checkpoint keeps the init's tokenizer, and its weights were trained
    assert load_tokenizer(ckpt_sft).tk.to_str() == load_tokenizer(m0[1]).tk.to_str()
    w0, w1 = load_weights(m0[1]), load_weights(ckpt_sft)
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert "eval_loss" in read_metrics(cfg_sft.out_dir)[-1]


# -----------------------------------------------------------------------------
# The world corpus


def test_world_corpus_is_plain_text_with_the_eval_split_first():
    """world_corpus: the world's documents unchanged (no chat template, no special tokens), the first eval_frac held out."""
    cfg = sft.SFTConfig(corpus_docs=60, eval_frac=0.1, world_seed=3)
    train, evals = sft.world_corpus(cfg)
    docs = tasks.pretrain_corpus(cfg.world_seed, cfg.corpus_docs)
    assert evals + train == docs and len(evals) == 6
    assert not any("<|" in d for d in docs)


# -----------------------------------------------------------------------------
# Gradient accumulation, used out_dirs, divergence, flags, user errors


def test_grad_accumulation_weights_micro_batches_by_their_targets(tok):
    """batch 2 x accum 1 and batch 1 x accum 2 give the same gradient (the step's loss is the
    mean over all its supervised tokens), even when the two replies differ a lot in length."""
    short, long_ = ("Compute 1 + 2.", "3."), ("Reverse: cat dog egg hat pen bed", "Reversed: " + "bed pen hat egg dog cat " * 4)
    chats = [encode_chat(tok, *short), encode_chat(tok, *long_)]
    both = pad_batch([c[0] for c in chats], tok.pad_id, "right", [c[1] for c in chats])
    ones = [pad_batch([c[0]], tok.pad_id, "right", [c[1]]) for c in chats]
    assert int(ones[0][2].sum()) * 3 < int(ones[1][2].sum())  # very different reply lengths
    grads = []
    for batches in ([(both[0], None, both[2])], [(i, None, m) for i, _, m in ones]):
        model = tiny_model(tok, seed=3)
        loss = sft.backward(model, batches, torch.device("cpu"))
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_fresh_run_refuses_a_used_out_dir_unless_overwrite(m0, sft_data, tmp_path):
    """A second fresh run into the same out_dir would append to metrics.jsonl (steps repeat):
    refused with a message naming --resume/--overwrite; --overwrite starts afresh."""
    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=m0[1], data=sft_data, max_steps=2)
    sft.main(cfg)
    with pytest.raises(UserError, match="--overwrite"):
        sft.main(cfg)
    sft.main(dataclasses.replace(cfg, overwrite=True))
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [1, 2]


def test_resume_refuses_changed_settings_but_may_extend_max_steps(m0, sft_data, tmp_path):
    """--resume with another lr would silently mix two runs: refused, naming the setting.
    A larger --max_steps extends the run."""
    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=m0[1], data=sft_data, max_steps=2, warmup_steps=0)
    sft.main(cfg)
    with pytest.raises(UserError, match="'lr'"):
        sft.main(dataclasses.replace(cfg, resume=True, lr=cfg.lr * 2, max_steps=3))
    sft.main(dataclasses.replace(cfg, resume=True, max_steps=3))
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [1, 2, 3]


def test_resume_refuses_weights_and_state_from_two_saves(m0, sft_data, tmp_path):
    """A kill between the renames of a save leaves new trainer state beside old weights: --resume
    says so instead of continuing from a mix."""
    from model import Transformer as T

    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=m0[1], data=sft_data, max_steps=2)
    ckpt = sft.main(cfg)
    T.from_pretrained(ckpt).save_pretrained(ckpt, metadata={"step": "1"})  # weights of "another" save
    with pytest.raises(UserError, match="two saves"):
        sft.main(dataclasses.replace(cfg, resume=True, max_steps=3))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(m0, sft_data, tmp_path):
    """--init with NaN weights: training stops at step 1 with a message, saves nothing, and
    metrics.jsonl holds no NaN (it stays valid JSON)."""
    bad = tmp_path / "nan_init"
    model = Transformer.from_pretrained(m0[1])
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(str(bad), tokenizer=load_tokenizer(m0[1]))
    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=str(bad), data=sft_data, max_steps=2)
    with pytest.raises(UserError, match=r"step 1: loss is nan"):
        sft.main(cfg)
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))
    assert not os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl"))


@pytest.mark.parametrize("flag, value", [("max_steps", -1), ("epochs", 0.0), ("grad_accum", 0), ("batch_size", 0), ("lr", -1.0),
                                         ("min_lr_ratio", 1.5), ("dropout", 1.0), ("mode", "rl"), ("dim", 31)])
def test_out_of_range_flags_are_refused_naming_the_flag(flag, value, tmp_path):
    with pytest.raises(UserError, match=f"--{flag} "):
        tiny_cfg(tmp_path / "s", **{flag: value})


def test_max_seq_len_applies_to_an_init_checkpoint(m0, sft_data, tmp_path):
    """--max_seq_len with --init changes the context (it used to be ignored silently)."""
    cfg = tiny_cfg(tmp_path / "s", mode="sft", init=m0[1], data=sft_data, max_steps=1, max_seq_len=96)
    assert Transformer.from_pretrained(sft.main(cfg)).config.max_seq_len == 96


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """From the command line a user's mistake prints 'error: ...' naming the problem, exit 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "sft.py", "--init", str(tmp_path / "nowhere"), "--data",
                        str(tmp_path), "--out_dir", str(tmp_path / "o")], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "is a directory" in r.stderr

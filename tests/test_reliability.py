"""Nothing lost, nothing faked: a run owns its out_dir, a checkpoint appears all at once, a failed
start deletes nothing, a --resume notices changed inputs, a metric without data is "n/a", and a
user's mistake is one line that names it. Each test is one item of the reliability review
(issue 16); its number is in the test's docstring."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import tqdm as tqdm_module

import checkpoint
import dpo
import evaluate
import judge
import reward
import self_reward
import sft
import tasks
import train_utils
from data import UserError, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=128, batch_size=16, seq_len=32,
            warmup_steps=2, eval_every=0, corpus_docs=200, device="cpu", show_example=False, dropout=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny M0, an SFT model that ends its replies, and a reward model (reward.py's layout)."""
    out = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m0 = sft.main(sft.SFTConfig(mode="pretrain", out_dir=str(out / "m0"), max_steps=3, **TINY))
        sft_model = sft.main(sft.SFTConfig(mode="sft", init=m0, out_dir=str(out / "sft"), max_steps=60, lr=3e-3,
                                           n_ift=120, n_eft=0, **TINY))
        torch.manual_seed(0)
        rm, tok = reward.load_reward_model(sft_model, head="new")
        rm.save_pretrained(str(out / "rm"), tok)
    finally:
        torch.set_num_threads(threads)
    return {"m0": m0, "sft": sft_model, "rm": str(out / "rm")}


def sft_cfg(out_dir, init, data, **kw):
    return sft.SFTConfig(**{**TINY, "mode": "sft", "init": init, "data": data, "out_dir": str(out_dir),
                            "max_steps": 2, "batch_size": 4, **kw})


def write_sft_data(path, n=12, long=False):
    rows = [{"prompt": t.prompt, "response": t.gold * (40 if long else 1)} for t in tasks.eval_prompts(9, n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_prefs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def world_prefs(n=24, seed=5):
    return [{"prompt": t.prompt, "chosen": t.gold, "rejected": "I do not know."} for t in tasks.eval_prompts(seed, n)]


def dpo_cfg(out_dir, init, data, **kw):
    return dpo.DPOConfig(**{"out_dir": str(out_dir), "init": init, "data": data, "batch_size": 4, "max_steps": 2,
                            "eval_every": 1, "warmup_steps": 1, "lr": 1e-3, "device": "cpu", "eval_frac": 0.2, **kw})


def snapshot(path):
    """{relative path: bytes} of every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


# -----------------------------------------------------------------------------
# Data loss


def test_1_a_second_run_on_a_used_out_dir_is_refused_naming_the_first(tmp_path):
    """Item 1: while one process runs in out_dir, another is refused with one line naming it;
    once the first process is gone (even killed) its lock is gone with it."""
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "import train_utils; train_utils.claim_dir(sys.argv[2], '--out_dir'); "
                               "print('held', flush=True); time.sleep(60)", ROOT, str(d)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = sft_cfg(d, "x", "y")
        with pytest.raises(UserError, match=rf"in use by another run \(process {holder.pid}\)"):
            train_utils.OutDir(cfg, {})
        with pytest.raises(UserError, match="in use by another run"):
            self_reward.check_run_dir(self_reward.Config(run_dir=str(d)))
    finally:
        holder.kill()
        holder.wait()
    out = train_utils.OutDir(sft_cfg(d, "x", "y"), {})  # the killed holder's lock died with it
    out.close()


def test_a_run_made_before_a_setting_existed_still_resumes(tmp_path):
    """A run_dir whose config.json lacks a setting added to the code later resumes when the
    setting keeps its default, and is refused, naming it, when it is given another value."""
    for value, refused in ((0.0, False), (1.3, True)):
        d = tmp_path / f"run_{value}"
        d.mkdir()
        old = dataclasses.asdict(self_reward.Config(run_dir=str(d)))
        del old["candidate_temperature"]
        (d / "config.json").write_text(json.dumps(old))
        cfg = self_reward.Config(run_dir=str(d), candidate_temperature=value)
        if refused:
            with pytest.raises(UserError, match="candidate_temperature"):
                self_reward.check_run_dir(cfg)
        else:
            self_reward.check_run_dir(cfg)
            assert json.loads((d / "config.json").read_text())["candidate_temperature"] == 0.0


def test_2_a_kill_at_any_moment_of_a_save_leaves_one_whole_checkpoint(models, tmp_path, monkeypatch):
    """Item 2: kill a save between any two of its renames: the next run finds the previous
    checkpoint or the new one, whole (weights and trainer state from the same step), resumes
    from it, and no hidden temporary directory or file is left."""
    model, tok = checkpoint.load_checkpoint(models["m0"])
    opt = torch.optim.AdamW(model.parameters())
    real_rename = os.rename
    for kill_at in range(1, 5):  # tmp->ready, (notes), final->old, ready->final
        cfg = sft_cfg(tmp_path / f"k{kill_at}", models["m0"], "d")
        out = train_utils.OutDir(cfg, {})
        out.start()
        out.save(model, tok, opt, 1)
        (tmp_path / f"k{kill_at}" / "model" / "notes.txt").write_text("mine")
        calls = []

        def rename_then_die(a, b):
            calls.append(b)
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            real_rename(a, b)

        monkeypatch.setattr(os, "rename", rename_then_die)
        with pytest.raises(KeyboardInterrupt):
            out.save(model, tok, opt, 2)
        monkeypatch.setattr(os, "rename", real_rename)
        out.close()
        again = train_utils.OutDir(dataclasses.replace(cfg, resume=True), {})
        state = again.load_state(torch.optim.AdamW(model.parameters()), "cpu")
        assert state["step"] in (1, 2)
        assert checkpoint.checkpoint_metadata(again.ckpt)["step"] == str(state["step"])
        assert (tmp_path / f"k{kill_at}" / "model" / "notes.txt").read_text() == "mine"
        assert [f for f in os.listdir(tmp_path / f"k{kill_at}") if f.startswith(".model")] == []
        again.close()


def test_2_stale_temp_files_of_a_killed_save_are_removed(models, tmp_path):
    """Item 2: the hidden .NAME.tmp-PID files a killed save_pretrained left are removed by the
    next save into that directory (those of a live process are kept)."""
    model, tok = checkpoint.load_checkpoint(models["m0"])
    d = tmp_path / "c"
    model.save_pretrained(str(d), tok)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = d / f".model.safetensors.tmp-{dead.stdout.strip()}"
    stale.write_bytes(b"x" * 1000)
    live = d / f".model.safetensors.tmp-{os.getppid()}"
    live.write_bytes(b"y")
    model.save_pretrained(str(d), tok)
    assert not stale.exists() and live.exists()


def test_3_a_failed_overwrite_deletes_nothing(models, tmp_path):
    """Item 3: --overwrite with data whose every example is too long fails, and the finished
    run it would have replaced is byte for byte intact."""
    cfg = sft_cfg(tmp_path / "run", models["m0"], write_sft_data(tmp_path / "ok.jsonl"))
    sft.main(cfg)
    before = snapshot(cfg.out_dir)
    bad = dataclasses.replace(cfg, data=write_sft_data(tmp_path / "long.jsonl", long=True), overwrite=True)
    with pytest.raises(UserError, match="no example fits"):
        sft.main(bad)
    after = {k: v for k, v in snapshot(cfg.out_dir).items() if k != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_3_a_read_only_out_dir_is_one_line_and_nothing_is_deleted(models, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    d.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write there"):
            train_utils.OutDir(sft_cfg(d, "x", "y", overwrite=True), {})
        assert (d / "metrics.jsonl").read_text() == '{"step": 1}\n'
    finally:
        d.chmod(0o755)


def test_3_an_out_dir_below_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="cannot be used"):
        train_utils.OutDir(sft_cfg(tmp_path / "f" / "run", "x", "y"), {})


# -----------------------------------------------------------------------------
# Silent wrong results


def test_4_a_budget_that_leaves_no_room_is_refused(models):
    """Item 4: a token budget as long as the context is refused, not turned into 0 points."""
    model, tok = checkpoint.load_checkpoint(models["sft"])
    with pytest.raises(UserError, match="no room for a prompt"):
        evaluate.instruction_following(model.eval(), tok, tasks.eval_prompts(3, 4), 0.0, None,
                                       max_new_tokens=model.config.max_seq_len)


def test_4_an_unanswered_prompt_is_never_scored(monkeypatch):
    """Item 4: a prompt that does not fit is left out of every statistic (and of comparisons)."""
    eval_tasks = tasks.eval_prompts(3, 4)
    answers = [t.gold if i % 2 else None for i, t in enumerate(eval_tasks)]
    monkeypatch.setattr(evaluate, "sample_responses", lambda *a, **k: [[x] for x in answers])
    r = evaluate.instruction_following(None, None, eval_tasks)
    assert r["points"] == [None, 5, None, 5] and r["oracle_mean"] == 5 and r["unanswered"] == 2
    c = evaluate.compare(r["points"], [0, 0, 0, 0])
    assert c["win"] == 100 and c["mean_diff"] == 5


def test_5_a_metric_without_data_is_none_and_json_is_strict(tmp_path):
    """Item 5: with one response per prompt there is no pair to order: pairwise accuracy is
    None ("n/a"), not 0; every JSON the project writes is strict (NaN refused)."""
    m = evaluate.reward_modeling([[3.0], [4.0]], [[2], [5]])
    assert m["pairwise_accuracy"] is None and m["spearman"] is None and m["kendall_tau"] is None
    assert m["five_best"] is None and evaluate.fmt(None) == "n/a"
    with pytest.raises(UserError, match="--k 1"):
        evaluate.EvalConfig(k=1)
    with pytest.raises(ValueError):
        write_json(str(tmp_path / "x.json"), {"a": math.nan})


def test_6_pairs_whose_chosen_equals_rejected_are_skipped_and_counted(models, tmp_path, capsys):
    """Item 6: a pair with nothing to prefer is skipped and counted; none left is an error."""
    rows = world_prefs(24)
    rows[0]["rejected"] = rows[0]["chosen"]
    dpo.main(dpo_cfg(tmp_path / "a", models["sft"], write_prefs(tmp_path / "p.jsonl", rows)))
    assert "skipped 1 of 24 pairs whose chosen and rejected are the same text" in capsys.readouterr().out
    same = [dict(r, rejected=r["chosen"]) for r in rows]
    with pytest.raises(UserError, match="no pair to train on"):
        dpo.main(dpo_cfg(tmp_path / "b", models["sft"], write_prefs(tmp_path / "s.jsonl", same)))
    assert not os.path.exists(tmp_path / "b" / "metrics.jsonl")


def test_7_a_checkpoint_of_the_wrong_kind_is_one_line(models, tmp_path):
    """Item 7: a reward model given as a policy, or a policy given as a reward model, is named."""
    data = write_prefs(tmp_path / "p.jsonl", world_prefs(24))
    with pytest.raises(UserError, match="is a reward model"):
        dpo.main(dpo_cfg(tmp_path / "a", models["rm"], data))
    with pytest.raises(UserError, match="is a reward model"):
        checkpoint.load_checkpoint(models["rm"])
    with pytest.raises(UserError, match="is not a reward model"):
        reward.load_reward_model(models["sft"], head="saved")


def test_8_resume_refuses_a_changed_data_file(models, tmp_path):
    """Item 8: the digest of every input is recorded; a --resume whose data changed is refused."""
    path = tmp_path / "p.jsonl"
    rows = world_prefs(24)
    cfg = dpo_cfg(tmp_path / "a", models["sft"], write_prefs(path, rows))
    dpo.main(cfg)
    write_prefs(path, [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows])  # swapped
    with pytest.raises(UserError, match="--data .* has changed"):
        dpo.main(dataclasses.replace(cfg, resume=True, max_steps=4))
    write_prefs(path, rows)  # the same contents again: resumes
    dpo.main(dataclasses.replace(cfg, resume=True, max_steps=4))


def test_10_the_held_out_split_is_by_prompt():
    """Item 10: a ranked list's pairs share their prompt; all of them land on one side."""
    from data import Preference

    prefs = [Preference(f"p{i}", f"a{j}", f"b{j}") for i in range(40) for j in range(6)]
    train, held = dpo.split_by_prompt(prefs, 0.25, seed=3)
    assert len(held) == 10 * 6 and len(train) == 30 * 6
    assert not {p.prompt for p in train} & {p.prompt for p in held}


def test_11_ipo_with_label_smoothing_is_refused():
    with pytest.raises(UserError, match="--label_smoothing"):
        dpo.DPOConfig(loss="ipo", label_smoothing=0.1)
    dpo.DPOConfig(loss="ipo")


@pytest.mark.parametrize("flag, value", [("sft_epochs", -5.0), ("dpo_beta", 0.0), ("dpo_lr", float("nan")),
                                         ("pretrain_steps", 0), ("dpo_epochs", float("inf")),
                                         ("max_new_tokens", 300)])
def test_12_self_reward_checks_every_stage_flag_at_start_up(flag, value):
    """Item 12: a flag self_reward.py passes to a stage is checked before anything runs, by its
    own name."""
    with pytest.raises(UserError, match=f"--{flag} "):
        self_reward.Config(**{flag: value})


def test_13_an_evaluation_prompt_that_was_trained_on_is_kept_out(tmp_path, capsys):
    """Item 13: with --init, a prompt of the pool that is also in --ift never evaluates a model."""
    import self_reward_real

    pool = [{"prompt": f"Question number {i}?", "response": "-"} for i in range(30)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (tmp_path / "ift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool[:20]))
    cfg = self_reward.Config(preset="real", init="x", prompts=str(tmp_path / "pool.jsonl"),
                             ift=str(tmp_path / "ift.jsonl"), n_eval=5, n_prompts=10, iterations=1)
    eval_prompts, rest, overlap = self_reward_real.split_pool(cfg)
    assert overlap == 20 and len(eval_prompts) == 5
    assert not set(eval_prompts) & {r["prompt"] for r in pool[:20]}
    assert len(rest) == 25 and not set(rest) & set(eval_prompts)
    assert "20 prompts are also in --ift/--eft" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Tracebacks and wrong advice


def test_14_a_disabled_progress_bar_breaks_nothing(models, tmp_path, monkeypatch):
    """Item 14: with TQDM_DISABLE=1 (a disabled bar has no .initial) dpo.py and reward.py run."""
    class quiet(tqdm_module.tqdm):  # what TQDM_DISABLE=1 makes of every bar
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(dpo, "tqdm", quiet)
    monkeypatch.setattr(reward, "tqdm", quiet)
    data = write_prefs(tmp_path / "p.jsonl", world_prefs(24))
    dpo.main(dpo_cfg(tmp_path / "d", models["sft"], data))
    reward.main(reward.RewardConfig(init=models["sft"], data=data, out_dir=str(tmp_path / "r"), max_steps=2,
                                    batch_size=2, eval_every=1, eval_frac=0.2, device="cpu", n_norm=16))


def test_15_dpo_without_periodic_evaluation_still_reports(models, tmp_path, capsys):
    data = write_prefs(tmp_path / "p.jsonl", world_prefs(24))
    dpo.main(dpo_cfg(tmp_path / "d", models["sft"], data, eval_every=0))
    assert "held-out pairs, before -> after" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 2.0), ("n_eval", 0), ("judge_samples", 0)])
def test_16_evaluate_checks_its_flags(flag, value):
    with pytest.raises(UserError, match=f"--{flag} "):
        evaluate.EvalConfig(**{flag: value})


@pytest.mark.parametrize("cls, flag", [(sft.SFTConfig, "lr"), (dpo.DPOConfig, "epochs"), (dpo.DPOConfig, "beta"),
                                       (reward.RewardConfig, "lr")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_17_nan_and_inf_are_refused_by_every_float_flag(cls, flag, value):
    with pytest.raises(UserError, match=f"--{flag} {value} \\(must be a finite number\\)"):
        cls(**{flag: value})


def test_17_ppo_no_eos_score_nan_is_refused():
    import ppo

    with pytest.raises(UserError, match="--no_eos_score nan"):
        ppo.PPOConfig(no_eos_score=float("nan"))


def test_18_a_damaged_reward_model_is_one_line(models, tmp_path):
    """Item 18: a truncated head, a missing reward.json, a run_dir that is a file."""
    import shutil

    bad = tmp_path / "rm"
    shutil.copytree(models["rm"], bad)
    data = (bad / "score.safetensors").read_bytes()
    (bad / "score.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or truncated"):
        reward.load_reward_model(str(bad), head="saved")
    shutil.copy(os.path.join(models["rm"], "score.safetensors"), bad / "score.safetensors")
    os.remove(bad / "reward.json")
    with pytest.raises(UserError, match="no reward.json"):
        reward.load_reward_model(str(bad), head="saved")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        self_reward.check_run_dir(self_reward.Config(run_dir=str(tmp_path / "file")))


def test_19_messages_say_what_is_actually_wrong(models, tmp_path):
    """Item 19: ranked lists that are all ties, pairs that are all the same text, and a reward
    model whose normalisation is absurd are each named as such."""
    import shutil

    ties = [{"prompt": t.prompt, "responses": ["a", "b", "c"], "scores": [1, 1, 1]} for t in tasks.eval_prompts(5, 24)]
    data = write_prefs(tmp_path / "ties.jsonl", ties)
    with pytest.raises(UserError, match="one tie"):
        dpo.main(dpo_cfg(tmp_path / "d", models["sft"], data))
    with pytest.raises(UserError, match="one tie"):
        reward.main(reward.RewardConfig(init=models["sft"], data=data, out_dir=str(tmp_path / "r"), device="cpu"))
    same = write_prefs(tmp_path / "same.jsonl", [dict(r, rejected=r["chosen"]) for r in world_prefs(24)])
    with pytest.raises(UserError, match="chosen equals its rejected"):
        reward.main(reward.RewardConfig(init=models["sft"], data=same, out_dir=str(tmp_path / "r2"), device="cpu"))
    bad = tmp_path / "rm"
    shutil.copytree(models["rm"], bad)
    norm = json.loads((bad / "reward.json").read_text())
    (bad / "reward.json").write_text(json.dumps({**norm, "gain": 1e30}))
    with pytest.raises(UserError, match="no usable normalisation"):
        reward.load_reward_model(str(bad), head="saved")


def test_20_a_judge_that_parses_nothing_gives_no_verdict(monkeypatch):
    """Item 20: when the evaluation judge never scores both responses, there is no verdict,
    not 100% ties."""
    monkeypatch.setattr(judge, "score", lambda *a, **k: [judge.Judgment(None, [None], ["?"])] * len(a[3]))
    h = evaluate.judged_head_to_head(None, None, "{instruction}{response}", ["p", "q"], ["a", "b"], ["c", "d"])
    assert h["verdict"] is False and h["win"] is None and h["tie"] is None and h["parse_failure_rate"] == 100
    monkeypatch.setattr(judge, "score", lambda *a, **k: [judge.Judgment(s, [s], ["?"]) for s in [5.0, 1.0, 2.0, 2.0]])
    h = evaluate.judged_head_to_head(None, None, "{instruction}{response}", ["p", "q"], ["a", "b"], ["c", "d"])
    assert h["verdict"] is True and h["win"] == 50 and h["loss"] == 50 and h["judged_prompts"] == 2

"""The main command end to end, at toy sizes: M0 -> SFT baseline -> M1, evaluation, report."""

import json
import os


import self_reward

TINY = dict(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=256,
            corpus_docs=300, pretrain_steps=3, pretrain_batch_size=4, pretrain_seq_len=32,
            ift=8, eft=8, sft_epochs=1.0, sft_batch_size=4, n_eval=6, n_eft_eval=2, k=3,
            judge_samples=2, max_new_tokens=8, judge_max_new_tokens=8, eval_batch_size=8)




def test_run_writes_every_stage_and_the_report_then_resumes(tmp_path, capsys):
    """Each stage leaves a loadable checkpoint and its evaluation; report.md holds both tables
    with one row per model; a second run reuses every finished stage instead of retraining."""
    cfg = self_reward.Config(run_dir=str(tmp_path / "run"), device="cpu", **TINY)
    self_reward.main(cfg)
    for stage in ("M0", "SFT", "M1"):
        d = tmp_path / "run" / stage
        assert (d / "model" / "model.safetensors").exists() and (d / "model" / "tokenizer.json").exists()
        ev = json.loads((d / "eval.json").read_text())
        assert 0 <= ev["sampled"]["oracle_mean"] <= 5 and len(ev["sampled"]["points"]) == TINY["n_eval"]
        assert ("judge" in ev) == (stage != "M0")  # M0 was never taught to judge
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Instruction following" in report and "## Reward modeling" in report
    for row in ("| M0 |", "| SFT |", "| M1 |"):
        assert row in report
    assert "not implemented yet" in report  # the run says what it does not do
    stamp = os.path.getmtime(tmp_path / "run" / "M0" / "model" / "model.safetensors")
    capsys.readouterr()
    self_reward.main(cfg)
    out = capsys.readouterr().out
    assert out.count("reusing it") == 3
    assert os.path.getmtime(tmp_path / "run" / "M0" / "model" / "model.safetensors") == stamp

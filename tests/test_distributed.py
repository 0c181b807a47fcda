"""Data parallel under torchrun (gloo on the CPU, 2 processes): N ranks x batch b take the step
that one process takes with batch N·b; only rank 0 writes; --resume works the same; PPO
whitens its advantages over every rank's tokens. Each launch costs a few seconds."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dpo
import ppo
import reward
import sft
import tasks
import train_utils
from data import epoch_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(device="cpu", dropout=0.0, eval_every=0, warmup_steps=1, min_lr_ratio=1.0, lr=1e-3)


def torchrun(script, *args, n=2):
    """`torchrun --standalone --nproc_per_node n script args` from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # gloo can abort a rank as its process exits, after the script's work is done and rank 0
    # has saved (a teardown race inside torch, seen once in this project's many test runs):
    # that alone does not fail a test, since every test then checks what the run wrote
    teardown_abort = "terminate called without an active exception" in r.stderr and "\nsaved " in r.stdout
    assert r.returncode == 0 or teardown_abort, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def flags(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def weights(out_dir):
    return load_file(os.path.join(out_dir, "model", "model.safetensors"))


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    out = tmp_path_factory.mktemp("m0")
    cfg = sft.SFTConfig(mode="pretrain", out_dir=str(out), vocab_size=300, dim=32, n_layers=1, n_heads=2,
                        n_kv_heads=2, max_seq_len=128, batch_size=4, seq_len=32, max_steps=3, corpus_docs=200,
                        **TINY)
    return sft.main(cfg)


def test_rank_batches_split_the_global_batch(monkeypatch):
    """The ranks' batches are disjoint and together are the global batch of one process with
    batch_size x N, epoch after epoch (no example seen twice per epoch, none left out)."""
    n, b, world = 23, 3, 2
    monkeypatch.setattr(train_utils, "world_size", lambda: world)
    for i in range(12):  # 3 epochs of 3 global batches
        parts = []
        for r in range(world):
            monkeypatch.setattr(train_utils, "rank", lambda r=r: r)
            parts.append(train_utils.rank_batch(n, b, 7, i))
        assert all(len(p) == b for p in parts)
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == epoch_batch(n, b * world, 7, i)


def test_sft_two_ranks_take_the_step_of_one_process_with_twice_the_batch(m0, tmp_path):
    """SFT's loss is a mean over supervised tokens, and replies differ in length: a plain DDP
    mean of per-rank means would weigh a short reply's tokens more. Also: rank 0 alone writes
    (one metrics row per step), and a 2-rank --resume continues the 2-rank run exactly."""
    common = dict(init=m0, n_ift=40, n_eft=0, **TINY)
    one = sft.main(sft.SFTConfig(out_dir=str(tmp_path / "one"), batch_size=4, max_steps=2, **common))
    torchrun("sft.py", *flags(out_dir=tmp_path / "two", batch_size=2, max_steps=2, **common))
    assert_close(weights(tmp_path / "two"), load_file(os.path.join(one, "model.safetensors")), atol=1e-5)
    rows, rows_one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [1, 2]
    for r, r1 in zip(rows, rows_one):
        assert r["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)

    torchrun("sft.py", *flags(out_dir=tmp_path / "resumed", batch_size=2, max_steps=1, **common))
    torchrun("sft.py", "--resume", *flags(out_dir=tmp_path / "resumed", batch_size=2, max_steps=2, **common))
    a, b = weights(tmp_path / "resumed"), weights(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2]
    # another number of ranks would change every batch from here on: refused
    with pytest.raises(sft.UserError, match="trained on 2 rank"):
        sft.main(sft.SFTConfig(out_dir=str(tmp_path / "resumed"), resume=True, batch_size=2, max_steps=3, **common))


def preference_file(path, n=24):
    rng = random.Random(0)
    with open(path, "w") as f:
        for t in (tasks.sample_task(rng, split="train") for _ in range(n)):
            f.write(json.dumps({"prompt": t.prompt, "chosen": t.gold,
                                "rejected": tasks.corrupt(t, rng, "partly_wrong")}) + "\n")
    return str(path)


@pytest.mark.parametrize("script", ["dpo", "reward"])
def test_dpo_and_reward_two_ranks_take_the_step_of_one_process_with_twice_the_batch(m0, tmp_path, script):
    """Per-pair (DPO) and per-prompt (RM) means over equal shares: DDP's mean is exact."""
    module = {"dpo": (dpo, dpo.DPOConfig), "reward": (reward, reward.RewardConfig)}[script]
    data = preference_file(tmp_path / "prefs.jsonl")
    common = dict(init=m0, data=data, eval_frac=0.0, **TINY)
    module[0].main(module[1](out_dir=str(tmp_path / "one"), batch_size=4, max_steps=2, **common))
    torchrun(f"{script}.py", *flags(out_dir=tmp_path / "two", batch_size=2, max_steps=2, **common))
    # Adam divides by sqrt(v): where a gradient is ~0, float noise in it moves the weight by up to
    # ~lr (1e-3) in either direction, so weights are compared to 2e-4 and the gradient norms
    # (which a wrong scale or a wrong mean would change) to 1e-4 relative
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"), atol=2e-4)
    rows, rows_one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in rows_one], rel=1e-4)


WHITEN = """
import sys, torch, ppo, train_utils
device = train_utils.init_distributed("cpu")
r = train_utils.rank()
x, mask = torch.load(sys.argv[1])
part = slice(3 * r, 3 * r + 3)  # rank r holds rows 3r .. 3r+2
out = ppo.masked_whiten(x[part], mask[part], mean_fn=ppo.all_ranks_masked_mean)
# statistics: "rm_score" only where a rank had a finished response (here rank 1 alone)
stats = train_utils.all_mean({"kl": 1.0 + r, **({"rm_score": 5.0} if r == 1 else {}), "note": "x"})
torch.save((out, stats), sys.argv[2] + f".{r}")
train_utils.finish_distributed()
"""


def test_ppo_whitens_advantages_over_every_ranks_tokens(tmp_path):
    """Two ranks with 3 rows each whiten as one process with all 6 rows, padding excluded; the
    ranks' own statistics would give another answer (the data are chosen so they differ).
    Logged statistics are averaged over ranks, also when only one rank has one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    x[3:] += 4.0  # rank 1's advantages sit higher: per-rank whitening would centre each half at 0
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 2:] = 0  # padding after EOS, with values that must not count
    torch.save((x, mask), tmp_path / "in.pt")
    (tmp_path / "whiten.py").write_text(WHITEN)
    env_script = str(tmp_path / "whiten.py")
    torchrun(env_script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"))
    results = [torch.load(tmp_path / f"out.pt.{r}") for r in range(2)]
    got = torch.cat([out for out, _ in results])
    want = ppo.masked_whiten(x, mask)
    # statistics are the same on every rank; one that only some ranks have is their mean
    assert results[0][1] == results[1][1] == {"kl": 1.5, "rm_score": 5.0, "note": "x"}
    assert torch.allclose(got, want, atol=1e-6)
    per_rank = torch.cat([ppo.masked_whiten(x[:3], mask[:3]), ppo.masked_whiten(x[3:], mask[3:])])
    assert not torch.allclose(per_rank, want, atol=1e-2)

"""Benchmark tinyalign's Transformer against Hugging Face's LlamaForCausalLM.

On the SAME random weights and the SAME inputs, in one run, for each model config:
  1. training tokens/s: forward + cross-entropy (fp32 log-softmax) + backward + AdamW step,
     tinyalign vs HF (HF's model is built from our checkpoint; logits are compared first)
  2. generation tokens/s, greedy, exactly `new_tokens` new tokens: our KV-cache `generate` vs
     HF `model.generate` (use_cache=True) vs a naive loop that re-runs the whole sequence each
     step, at several batch sizes; plus the fraction of greedy tokens on which they agree
  3. model FLOPs utilisation (MFU) of training against a matmul peak measured in this run

Numbers are reported, never asserted: a slow machine is not a failing test. Targets are printed
beside them. Usage:

  python bench.py                                  # tiny and small, best device (~1 min on 2 idle CPU cores)
  python bench.py --configs tiny --out bench.md    # also write the markdown table to a file
  python bench.py --device cuda --compile          # bf16 autocast on CUDA, torch.compile (training; the compiled sampler)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, autocast
from sampling import generate
from train_utils import get_device, parse_config


# -----------------------------------------------------------------------------
# Config


@dataclass
class BenchConfig:
    configs: str = "tiny,small"  # which entries of MODELS to run, comma-separated
    device: str = "auto"  # auto = cuda > mps > cpu
    compile: bool = False  # torch.compile both models for the training step, and time generate's compiled fast path
    batch_size: int = 0  # training batch; 0 = the per-config default in TRAIN_SHAPES
    seq_len: int = 0  # training sequence length; 0 = default
    train: bool = True  # time training and MFU (--no-train: generation only)
    train_steps: int = 0  # timed training steps per model; 0 = default
    warmup_steps: int = 2  # untimed steps first: allocator, oneDNN/cuBLAS plans, compile, Adam state
    gen_batches: str = "1,64"  # generation batch sizes; "" = time training only
    prompt_len: int = 32
    new_tokens: int = 128
    gen_repeats: int = 3  # timed generations per method; the median is reported
    naive_repeats: int = 1  # the no-cache loop is slow; one timed run is plenty
    naive_max_batch: int = 8  # run the no-cache loop on at most this many rows (0 = all)
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default (one per core). On a shared
    # machine 1 can be steadier: an OpenMP thread whose sibling core is busy waits a whole timeslice
    seed: int = 1337
    out: str = ""  # also write the markdown table here


# The benchmarked models. `max_seq_len` is set at run time to fit training and generation.
MODELS = {
    # ~0.87M parameters
    "tiny": ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=4),
    # ~6.7M parameters (dim 256 with 6 layers and vocab 2048 would be only 4.75M), with
    # grouped-query attention: 8 query heads share 2 key/value heads
    "small": ModelConfig(vocab_size=4096, dim=256, n_layers=8, n_heads=8, n_kv_heads=2),
    # ~135M, SmolLM2-135M's shape: the size issue 21's GPU MFU target is stated at
    "135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                        rope_theta=100000.0),
}

# default training shapes (batch, seq_len, timed steps): small enough that the default CPU run
# stays within a few minutes, big enough on a GPU that the kernels, not Python, dominate
TRAIN_SHAPES = {
    ("tiny", "cpu"): (16, 128, 10),
    ("small", "cpu"): (8, 256, 5),
    ("tiny", "cuda"): (64, 256, 30),
    ("small", "cuda"): (32, 512, 30),
    ("135m", "cpu"): (1, 128, 2),
    ("135m", "cuda"): (16, 1024, 20),
}

# what we aim for (ratios of tokens/s)
TARGET_TRAIN_VS_HF = 1.2
TARGET_GEN_VS_HF = {1: 2.0, 64: 1.5}  # other batch sizes use the batch-64 target
TARGET_GEN_VS_HF_CUDA = {1: 3.0, 64: 1.5}  # on a GPU, where launch overhead is what compiling removes
TARGET_MFU_CUDA = 0.40  # bf16 training at the 135M shape
TARGET_GEN_VS_NAIVE = 5.0


# -----------------------------------------------------------------------------
# Timing


def sync(device):
    # CUDA kernels run asynchronously: without this we would time the launches, not the work
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timeit(fns: dict, device, warmup: int, repeats: int | dict) -> dict:
    """Median wall time (s) of each callable. The callables are timed in turns (a, b, c, a, b,
    c, ...) so that a clock or thermal drift during the run hits all of them alike.
    `repeats` may be a dict name -> count (a method may need fewer runs)."""
    reps = repeats if isinstance(repeats, dict) else {k: repeats for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for r in range(max(reps.values())):
        for k, fn in fns.items():
            if r >= reps[k]:
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_matmul(device):
    """One large matmul: its achieved FLOP/s is the practical peak of this device. fp32 on CPU,
    bf16 on CUDA (what autocast trains in). Returns (callable, FLOPs per call)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3  # n^2 outputs, each n multiply-adds


# -----------------------------------------------------------------------------
# FLOPs


def matmul_params(model: Transformer) -> int:
    """Parameters that are multiplied once per token: every layer plus the output head. The input
    embedding is a table lookup (0 FLOPs); a tied head shares its matrix but still does a
    dim x vocab matmul, so it is counted. (Norm gains are counted too; they are negligible.)"""
    n = model.num_params() - model.embed_tokens.weight.numel()
    return n + model.lm_head.weight.numel()


def flops_per_token(model: Transformer, seq_len: int) -> int:
    """Training FLOPs per token, as in PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's
    estimate_mfu:   6 * N  +  12 * n_layers * dim * seq_len
    6N: each weight does one multiply-add (2 FLOPs) per token in the forward pass and two in the
    backward (gradient w.r.t. the input and w.r.t. the weight). 12 * L * dim * T: per layer the
    scores Q K^T and the weighted sum A V each cost 2 * T * (n_heads * head_dim) FLOPs per token
    forward, times 3 for forward + backward. The convention counts the full T x T matrix, not the
    causal half, and uses n_heads * head_dim (= dim here), not the fewer key/value heads."""
    cfg = model.config
    return 6 * matmul_params(model) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# -----------------------------------------------------------------------------
# The two models


def build_models(cfg: ModelConfig, device, seed: int):
    """Our Transformer with random weights, and HF's LlamaForCausalLM loaded from its checkpoint:
    the same weights, through the same file format a user would use."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        ours.save_pretrained(path)
        # sdpa on both sides: the same attention kernel, so we compare everything around it
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return ours.to(device), hf.to(device)


@torch.no_grad()
def max_logit_diff(ours, hf, device, seed: int) -> float:
    """Same input, fp32, no autocast: the two implementations must agree to rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, ours.config.vocab_size, (4, 64), generator=g).to(device)
    ours.eval(), hf.eval()
    return (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()


# -----------------------------------------------------------------------------
# Training


def make_train_step(forward, params, x, y, device):
    """One optimisation step: forward, fp32 cross-entropy, backward, AdamW (plain, the same for
    both models; sft.py adds parameter groups and clipping, which cost little)."""
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)

    def step():
        with autocast(device):
            logits = forward(x)
        # the loss in fp32 whatever autocast produced: bf16 log-softmax loses digits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(ours, hf, bc: BenchConfig, shape, device) -> dict:
    """Training tokens/s of both models, and the matmul peak measured in the same loop."""
    B, T, steps = shape
    g = torch.Generator().manual_seed(bc.seed + 1)
    data = torch.randint(0, ours.config.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    # train copies, so the generation benchmark still sees the weights the HF model was built from
    ours, hf = copy.deepcopy(ours).train(), copy.deepcopy(hf).train()
    fwd_ours = ours
    fwd_hf = lambda ids: hf(input_ids=ids, use_cache=False).logits  # no KV cache in training
    if bc.compile:
        fwd_ours = torch.compile(ours)
        hf_compiled = torch.compile(hf)
        fwd_hf = lambda ids: hf_compiled(input_ids=ids, use_cache=False).logits
    matmul, matmul_flops = make_matmul(device)
    fns = {
        "ours": make_train_step(fwd_ours, ours.parameters(), x, y, device),
        "hf": make_train_step(fwd_hf, hf.parameters(), x, y, device),
        # the peak is timed in turns with the training steps, so that whatever else runs on the
        # machine slows the numerator and the denominator of MFU alike
        "peak": matmul,
    }
    t = timeit(fns, device, warmup=bc.warmup_steps, repeats=steps)
    return {"ours": B * T / t["ours"], "hf": B * T / t["hf"], "peak": matmul_flops / t["peak"]}


# -----------------------------------------------------------------------------
# Generation


def ours_generate(model, prompts, n, compile=False):
    # temperature 0 = greedy; eos_id -1 can never be an argmax, so every row runs n tokens.
    # compile=True: the static-shape loop with its step under torch.compile (sampling.py)
    return generate(model, prompts, max_new_tokens=n, eos_id=-1, pad_id=0, temperature=0, compile=compile).tokens


@torch.no_grad()
def hf_generate(model, prompts, n, device):
    # the checkpoint's config has no eos_token_id, so nothing stops early and we get exactly n
    with autocast(device):
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
            max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, use_cache=True,
        )
    return out[:, prompts.shape[1]:]


@torch.no_grad()
def naive_generate(model, prompts, n, device):
    """Greedy decoding without a cache: the full sequence goes through the model every step,
    so step t costs a forward over T0 + t tokens instead of over one."""
    model.eval()
    ids = prompts
    for _ in range(n):
        with autocast(device):
            logits = model(ids)[:, -1]
        ids = torch.cat([ids, logits.float().argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


def bench_generation(ours, hf, bc: BenchConfig, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(bc.seed + 2 + batch)
    prompts = torch.randint(0, ours.config.vocab_size, (batch, bc.prompt_len), generator=g).to(device)
    # the no-cache loop costs O(T^2) per row; at large batch it would take minutes, so it runs on
    # the first naive_max_batch rows only (it is compute-bound there, so tokens/s barely depends
    # on the batch; --naive_max_batch 0 runs it on the whole batch)
    nb = min(batch, bc.naive_max_batch or batch)
    ours.eval(), hf.eval()
    n = bc.new_tokens
    outs = {}

    def run(name, fn, p):
        def call():
            outs[name] = fn(p)  # keep the last output, to compare the methods' tokens
        return call

    fns = {
        "ours": run("ours", lambda p: ours_generate(ours, p, n), prompts),
        "hf": run("hf", lambda p: hf_generate(hf, p, n, device), prompts),
        "naive": run("naive", lambda p: naive_generate(ours, p, n, device), prompts[:nb]),
    }
    # warm up with a short generation each (allocator, kernel plans, HF's first-call setup)
    ours_generate(ours, prompts, 8), hf_generate(hf, prompts, 8, device), naive_generate(ours, prompts[:nb], 8, device)
    reps = {"ours": bc.gen_repeats, "hf": bc.gen_repeats, "naive": bc.naive_repeats}
    if bc.compile:  # the fast path; warmed up at the timed shape, so compilation is not timed
        fns["compiled"] = run("compiled", lambda p: ours_generate(ours, p, n, compile=True), prompts)
        ours_generate(ours, prompts, n, compile=True)
        reps["compiled"] = bc.gen_repeats
    t = timeit(fns, device, warmup=0, repeats=reps)
    for k, v in outs.items():
        assert v.shape == ((nb if k == "naive" else batch), n), f"{k} generated {tuple(v.shape)} tokens"
    res = {k: (nb if k == "naive" else batch) * n / v for k, v in t.items()}  # new tokens/s
    res["naive_rows"] = nb
    res["agree_hf"] = (outs["ours"] == outs["hf"]).float().mean().item()
    res["agree_naive"] = (outs["ours"][:nb] == outs["naive"]).float().mean().item()
    if "compiled" in outs:
        res["agree_compiled"] = (outs["ours"] == outs["compiled"]).float().mean().item()
    return res


# -----------------------------------------------------------------------------
# Report


def fmt_rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def met(ratio, target):
    return "yes" if ratio >= target else "**no**"


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time), or None
    where /proc/stat does not exist. Other programs on the same cores skew every number here
    (an OpenMP thread whose sibling is descheduled waits a whole timeslice: small matmuls get
    10x slower), so we say how busy the machine was."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # everything but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()


def cpu_other_busy(a, b) -> float:
    """Fraction of all cores used by other processes between two snapshots."""
    other = (b[0] - a[0]) - (b[1] - a[1])
    return max(0.0, other / ((b[2] - a[2]) * (os.cpu_count() or 1)))


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def main(argv=None):
    bc = parse_config(BenchConfig, __doc__, argv=argv)

    import transformers

    transformers.logging.set_verbosity_error()  # generation-config chatter
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    device = get_device(bc.device)
    if bc.threads:
        torch.set_num_threads(bc.threads)
    names = [c.strip() for c in bc.configs.split(",") if c.strip()]
    for c in names:
        if c not in MODELS:
            raise SystemExit(f"bench.py: unknown config {c!r}; choose from {sorted(MODELS)}")
    gen_batches = [int(b) for b in bc.gen_batches.split(",") if b.strip()]

    t_start = time.perf_counter()
    header = [
        f"device: {device_name(device)}" + (" (bf16 autocast)" if device.type == "cuda" else " (fp32)"),
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}"
        + (", torch.compile (training)" if bc.compile else ""),
    ]
    before = cpu_snapshot()
    if before is not None:
        time.sleep(0.5)
        busy = cpu_other_busy(before, cpu_snapshot())
        header.append(f"CPU busy with other work before the start: {busy:.0%}"
                      + (" (numbers will be noisy)" if busy > 0.2 else ""))
        before = cpu_snapshot()
    for line in header:
        print(line)

    rows, notes = [], []
    for name in names:
        shape = TRAIN_SHAPES.get((name, device.type)) or TRAIN_SHAPES.get((name, "cpu"), (8, 128, 5))
        B, T, steps = (bc.batch_size or shape[0], bc.seq_len or shape[1], bc.train_steps or shape[2])
        cfg = dataclasses.replace(MODELS[name], max_seq_len=max(T, bc.prompt_len + bc.new_tokens))
        ours, hf = build_models(cfg, device, bc.seed)
        diff = max_logit_diff(ours, hf, device, bc.seed)
        n_ours = ours.num_params()
        n_hf = sum(p.numel() for p in hf.parameters())
        print(f"\n[{name}] {n_ours / 1e6:.2f}M params (HF {n_hf / 1e6:.2f}M), dim {cfg.dim}, "
              f"{cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, vocab {cfg.vocab_size}; "
              f"max |logits ours - HF| = {diff:.2e} ({'ok' if diff < 1e-4 else 'MISMATCH'} at 1e-4)", flush=True)
        notes.append(f"{name}: {n_ours / 1e6:.2f}M params (dim {cfg.dim}, {cfg.n_layers} layers, "
                     f"{cfg.n_heads} heads, {cfg.n_kv_heads} kv heads, vocab {cfg.vocab_size}); "
                     f"max logit diff vs HF {diff:.1e}")

        # generation first, on the untouched weights (training runs on copies anyway)
        for b in gen_batches:
            t0 = time.perf_counter()
            r = bench_generation(ours, hf, bc, b, device)
            vs_hf, vs_naive = r["ours"] / r["hf"], r["ours"] / r["naive"]
            targets = TARGET_GEN_VS_HF_CUDA if device.type == "cuda" else TARGET_GEN_VS_HF
            tgt_hf = targets.get(b, targets[64])
            rows.append([
                name, f"generate tok/s, batch {b}", fmt_rate(r["ours"]), fmt_rate(r["hf"]),
                fmt_rate(r["naive"]) + (f" ({r['naive_rows']} rows)" if r["naive_rows"] < b else ""),
                f"{vs_hf:.2f}× HF · {vs_naive:.1f}× naive", f"≥{tgt_hf}× HF · ≥{TARGET_GEN_VS_NAIVE:.0f}× naive",
                f"{met(vs_hf, tgt_hf)} · {met(vs_naive, TARGET_GEN_VS_NAIVE)}",
            ])
            notes.append(f"{name}, batch {b}: greedy tokens identical to HF {r['agree_hf']:.1%}, "
                         f"to the no-cache loop {r['agree_naive']:.1%}")
            if "compiled" in r:
                rows.append([name, f"generate tok/s, batch {b}, compiled", fmt_rate(r["compiled"]), fmt_rate(r["hf"]),
                             "", f"{r['compiled'] / r['hf']:.2f}× HF · {r['compiled'] / r['ours']:.2f}× eager",
                             f"≥{tgt_hf}× HF", met(r["compiled"] / r["hf"], tgt_hf)])
                notes.append(f"{name}, batch {b}: compiled greedy tokens identical to eager {r['agree_compiled']:.1%}")
            print(f"  generate b={b}: ours {fmt_rate(r['ours'])} tok/s, HF {fmt_rate(r['hf'])}, "
                  f"naive {fmt_rate(r['naive'])}  ({vs_hf:.2f}× HF, {vs_naive:.1f}× naive; "
                  f"agree HF {r['agree_hf']:.1%}, naive {r['agree_naive']:.1%})"
                  + (f"; compiled {fmt_rate(r['compiled'])} tok/s ({r['compiled'] / r['hf']:.2f}× HF, "
                     f"agree eager {r['agree_compiled']:.1%})" if "compiled" in r else "")
                  + f" [{time.perf_counter() - t0:.0f}s]", flush=True)

        if not bc.train:
            del ours, hf
            continue
        t0 = time.perf_counter()
        r = bench_training(ours, hf, bc, (B, T, steps), device)
        fpt = flops_per_token(ours, T)
        mfu = {k: r[k] * fpt / r["peak"] for k in ("ours", "hf")}
        ratio = r["ours"] / r["hf"]
        rows.append([
            name, f"train tok/s ({B}×{T})", fmt_rate(r["ours"]), fmt_rate(r["hf"]), "–",
            f"{ratio:.2f}× HF", f"≥{TARGET_TRAIN_VS_HF}× HF", met(ratio, TARGET_TRAIN_VS_HF),
        ])
        mfu_target = device.type == "cuda" and name == "135m"  # a tiny model cannot fill a GPU
        rows.append([name, "train MFU", f"{mfu['ours']:.1%}", f"{mfu['hf']:.1%}", "–", "–",
                     f"≥{TARGET_MFU_CUDA:.0%}" if mfu_target else "–",
                     met(mfu["ours"], TARGET_MFU_CUDA) if mfu_target else "–"])
        notes.append(f"{name}: {fpt / 1e6:.2f} MFLOP per training token at seq_len {T}; matmul peak "
                     f"{r['peak'] / 1e9:,.1f} GFLOP/s ({'bf16 8192²' if device.type == 'cuda' else 'fp32 2048²'})")
        print(f"  train {B}×{T}: ours {fmt_rate(r['ours'])} tok/s (MFU {mfu['ours']:.1%}), "
              f"HF {fmt_rate(r['hf'])} (MFU {mfu['hf']:.1%}), {ratio:.2f}× HF; peak {r['peak'] / 1e9:,.1f} GFLOP/s "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        del ours, hf

    cols = ["config", "metric", "tinyalign", "HF", "naive", "ratio", "target", "met?"]
    table = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    elapsed = time.perf_counter() - t_start
    if before is not None:
        busy = cpu_other_busy(before, cpu_snapshot())
        header.append(f"CPU busy with other work during the run: {busy:.0%}"
                      + (" (it competes for the cores: compare ratios, not absolute numbers)" if busy > 0.2 else ""))
    footer = [f"- {n}" for n in notes] + [
        f"- generation: prompt {bc.prompt_len} tokens, {bc.new_tokens} new tokens, greedy; tok/s counts "
        f"new tokens (prefill included in the time); naive = full forward over the whole sequence every step, "
        f"on the first {bc.naive_max_batch or 'all'} rows of a batch",
        f"- MFU = achieved training FLOP/s / matmul peak; FLOPs per token = 6·N + 12·n_layers·dim·seq_len "
        f"(N = parameters in matmuls, output head included, input embedding not)",
        f"- medians of {bc.gen_repeats} generations ({bc.naive_repeats} for naive) and of the timed "
        f"training steps after {bc.warmup_steps} warm-up steps; whole run {elapsed:.0f}s",
    ]
    md = "\n".join([*(f"{h}  " for h in header), "", *table, "", *footer]) + "\n"
    print("\n" + md)
    if bc.out:
        with open(bc.out, "w") as f:
            f.write(md)
        print(f"wrote {bc.out}")


if __name__ == "__main__":
    main()

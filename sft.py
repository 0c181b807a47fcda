"""Language-model pretraining (M0) and supervised fine-tuning (M1, the SFT baseline).

  pretrain : next-token loss on every token of a document stream. From scratch on the task
             world's noisy "web" corpus this makes the base model M0 (a tokenizer is trained
             first, on the same corpus).
  sft      : next-token loss on the assistant reply only (the prompt is masked), on
             demonstrations in the chat template. InstructGPT's SFT step; in Self-Rewarding LMs
             M1 = SFT on instruction data (IFT) + judge data (EFT), the baseline = IFT alone.

    python sft.py --mode pretrain --out_dir runs/m0
    python sft.py --mode sft --init runs/m0/model --out_dir runs/m1            # world IFT+EFT
    python sft.py --mode sft --init runs/m0/model --out_dir runs/sft --eft 0   # IFT alone
    python sft.py --mode sft --init path/to/hf_model --data my.jsonl --out_dir runs/mine

Output: out_dir/model/ (a checkpoint in the HF layout, with tokenizer.json, the resolved
config and the trainer state for --resume) and out_dir/metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from data import (Tokenizer, encode_chat, encode_documents, load_sft_data, load_tokenizer, pad_batch,
                  show_supervision, train_tokenizer, write_jsonl)
from model import ModelConfig, Transformer, autocast, get_device, parse_config


@dataclass
class SFTConfig:
    mode: str = "sft"  # "pretrain" (loss on all tokens) or "sft" (loss on the response only)
    out_dir: str = "runs/sft"
    init: str = ""  # checkpoint directory to start from; pretrain without it starts from scratch
    data: str = ""  # sft: a JSONL file in any data.py format; pretrain: a .txt file (blank-line separated documents). Empty: the task world
    eval_frac: float = 0.05  # share of --data held out for the evaluation loss
    # the task world (used when --data is empty)
    seed: int = 1337
    world_seed: int = 0  # the world's data are generated from this seed
    corpus_docs: int = 20000  # pretrain: documents in the noisy corpus
    ift: int = 400  # sft: instruction-following demonstrations
    eft: int = 400  # sft: judge demonstrations (0 for the SFT baseline)
    # model shape when pretraining from scratch
    vocab_size: int = 1024
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    max_seq_len: int = 256
    dropout: float = 0.1  # the paper's SFT dropout
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 128  # pretrain: tokens per training window
    max_steps: int = 600
    lr: float = 1e-3
    min_lr: float = 1e-4  # linear decay from lr to min_lr after warm-up (paper: 5.5e-6 -> 1.1e-6)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # 0: save only at the end
    resume: bool = False
    device: str = "auto"
    compile: bool = False
    show_example: bool = True  # print one training example with its supervised part marked


# -----------------------------------------------------------------------------
# Data


def world_corpus(cfg: SFTConfig) -> tuple[list[str], list[str]]:
    """The world's noisy "web" as plain text. It never shows the chat template: as with a real
    base model, M0 meets <|im_start|>/<|im_end|> first in SFT, which teaches the format."""
    docs = tasks.pretrain_corpus(cfg.world_seed, cfg.corpus_docs)
    n_eval = max(1, int(len(docs) * cfg.eval_frac))
    return docs[n_eval:], docs[:n_eval]


def text_corpus(path: str, eval_frac: float) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8") as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    if len(docs) < 2:
        raise ValueError(f"{path}: need at least 2 documents (separated by blank lines)")
    n_eval = max(1, int(len(docs) * eval_frac))
    return docs[n_eval:], docs[:n_eval]


def world_examples(cfg: SFTConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) pairs of (prompt, response): IFT demonstrations and EFT judge examples.
    Eval pairs come from other seeds, so the eval loss is on unseen examples."""
    template = tasks.load_judge_template()
    train = tasks.ift_seed(cfg.world_seed + 1, cfg.ift)
    evals = tasks.ift_seed(cfg.world_seed + 101, max(16, cfg.ift // 10))
    if cfg.eft:
        train += tasks.eft_seed(cfg.world_seed + 2, cfg.eft, template)
        evals += tasks.eft_seed(cfg.world_seed + 102, max(16, cfg.eft // 10), template)
    return train, evals


def file_examples(path: str, eval_frac: float, seed: int):
    ex = [(e.prompt, e.response) for e in load_sft_data(path)]
    random.Random(seed).shuffle(ex)
    n_eval = max(1, int(len(ex) * eval_frac)) if len(ex) > 1 else 0
    return ex[n_eval:], ex[:n_eval]


def encode_examples(tok: Tokenizer, pairs, max_len: int, what: str, required: bool = True):
    """Tokenise (prompt, response) pairs with the chat template. Examples longer than the
    context are dropped and counted (never silently cut: a cut reply would teach the model
    to stop without EOS). With `required`, having none left is an error."""
    out = [encode_chat(tok, p, r) for p, r in pairs]
    kept = [x for x in out if len(x[0]) <= max_len]
    if len(kept) < len(out):
        print(f"{what}: dropped {len(out) - len(kept)} of {len(out)} examples longer than {max_len} tokens")
    if required and not kept:
        raise ValueError(f"{what}: no example fits in {max_len} tokens")
    return kept


def sft_batch(examples, batch_size: int, seed: int, i: int, pad_id: int):
    """The i-th batch of shuffled, right-padded examples; epochs follow each other, each in a
    fixed order per (seed, epoch). A pure function of i, so --resume sees the same batches."""
    per_epoch = len(examples) // batch_size
    epoch, j = divmod(i, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    chunk = [examples[k] for k in order[j * batch_size : (j + 1) * batch_size]]
    return pad_batch([c[0] for c in chunk], pad_id, "right", [c[1] for c in chunk])


def stream_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random windows of a token stream (nanoGPT-style). x, y: (B, seq_len)."""
    starts = torch.randint(len(stream) - seq_len - 1, (batch_size,), generator=gen)
    x = torch.stack([stream[s : s + seq_len] for s in starts])
    y = torch.stack([stream[s + 1 : s + 1 + seq_len] for s in starts])
    return x, y


# -----------------------------------------------------------------------------
# Loss


def lm_loss(model, input_ids, attention_mask, loss_mask):
    """Mean next-token cross-entropy over supervised targets.
    The logits at column t predict the token at t+1, so the targets are input_ids[:, 1:] and
    a target counts where loss_mask[:, 1:] is 1 (in SFT: the reply and its EOS)."""
    logits = model(input_ids, attention_mask=attention_mask)  # (B, T, V)
    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def stream_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up, then linear decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)


# -----------------------------------------------------------------------------
# Checkpoints


def save(model, tok, cfg: SFTConfig, optimizer, step: int):
    """out_dir/model/: weights, tokenizer, resolved config and the trainer state, written
    atomically as one directory."""
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, buf)
    model.save_pretrained(os.path.join(cfg.out_dir, "model"), tok, extra_files={
        "train_config.json": json.dumps(dataclasses.asdict(cfg), indent=2),
        "trainer_state.pt": buf.getvalue(),
    })


# -----------------------------------------------------------------------------
# Main


def main(cfg: SFTConfig) -> str:
    """Train; returns the checkpoint directory."""
    assert cfg.mode in ("pretrain", "sft"), cfg.mode
    device = get_device(cfg.device)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_dir = os.path.join(cfg.out_dir, "model")

    # data first: a bad file fails here, before any model is built
    if cfg.mode == "pretrain":
        train_docs, eval_docs = text_corpus(cfg.data, cfg.eval_frac) if cfg.data else world_corpus(cfg)
    else:
        train_pairs, eval_pairs = file_examples(cfg.data, cfg.eval_frac, cfg.seed) if cfg.data else world_examples(cfg)

    # tokenizer and model
    start_from = ckpt_dir if cfg.resume else cfg.init
    if cfg.resume and not os.path.exists(os.path.join(ckpt_dir, "trainer_state.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint with trainer state in {ckpt_dir}")
    if start_from:
        tok = load_tokenizer(start_from)
        model = Transformer.from_pretrained(start_from, dropout=cfg.dropout)
    else:
        if cfg.mode != "pretrain":
            raise ValueError("sft needs --init (a pretrained checkpoint directory)")
        texts = list(train_docs)
        if not cfg.data:
            # the judge's words (rubric, reason lines) must get tokens of their own, or a
            # judge prompt and its answer do not fit the context
            texts += [p + "\n" + r for p, r in tasks.eft_seed(cfg.world_seed + 5, 300, tasks.load_judge_template())]
        tok = train_tokenizer(texts, cfg.vocab_size)
        model = Transformer(ModelConfig(
            vocab_size=tok.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.max_seq_len, dropout=cfg.dropout,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    model.to(device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, device {device}")

    if cfg.mode == "pretrain":
        train_stream = encode_documents(tok, train_docs)
        eval_stream = encode_documents(tok, eval_docs)
        if len(eval_stream) <= cfg.seq_len + 1:
            eval_stream = train_stream  # tiny user corpora: evaluate on training text
        print(f"corpus: {len(train_docs)} documents, {len(train_stream)} tokens (eval {len(eval_stream)})")
    else:
        max_len = model.config.max_seq_len
        train_ex = encode_examples(tok, train_pairs, max_len, "train")
        eval_ex = encode_examples(tok, eval_pairs, max_len, "eval", required=False)
        if not eval_ex:
            print("eval: no held-out example fits the context; the eval loss uses training examples")
            eval_ex = train_ex[: cfg.batch_size]
        steps_per_epoch = max(1, len(train_ex) // cfg.batch_size)
        n_sup = sum(sum(m) for _, m in train_ex)
        print(f"sft: {len(train_ex)} examples, {n_sup} supervised tokens; {steps_per_epoch} batches per epoch, "
              f"{cfg.max_steps * cfg.grad_accum / steps_per_epoch:.1f} epochs")
        if cfg.show_example:
            print("one example, the unsupervised part in ⟦ ⟧:\n" + show_supervision(tok, *train_ex[0]))
        if cfg.batch_size > len(train_ex):
            raise ValueError(f"batch_size {cfg.batch_size} > {len(train_ex)} training examples")

    # AdamW with decay on matrices only (not on norms, biases)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    step = 0
    if cfg.resume:
        state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step}")
        # rows logged after the checkpoint (a crash between saves) are redone: drop them
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                rows = [json.loads(r) for r in f if r.strip()]
            write_jsonl(metrics_path, [r for r in rows if r["step"] <= step])
        if step >= cfg.max_steps:
            print(f"nothing to do: the checkpoint is at max_steps={cfg.max_steps}")
            return ckpt_dir
    train_model = torch.compile(model) if cfg.compile else model

    def micro_batches(step):
        """The grad_accum micro-batches of an optimizer step, a pure function of the step
        (so --resume continues exactly where the run stopped)."""
        for k in range(cfg.grad_accum):
            i = step * cfg.grad_accum + k
            if cfg.mode == "pretrain":
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
                x, y = stream_batch(train_stream, cfg.batch_size, cfg.seq_len, gen)
                yield x.to(device), y.to(device), None
            else:
                ids, attn, loss_mask = sft_batch(train_ex, cfg.batch_size, cfg.seed, i, tok.pad_id)
                yield ids.to(device), attn.to(device), loss_mask.to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = []
        gen = torch.Generator().manual_seed(12345)
        for k in range(cfg.eval_batches):
            with autocast(device):
                if cfg.mode == "pretrain":
                    x, y = stream_batch(eval_stream, cfg.batch_size, cfg.seq_len, gen)
                    losses.append(stream_loss(model, x.to(device), y.to(device)).item())
                else:
                    chunk = eval_ex[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                    if not chunk:
                        break
                    ids, attn, lm = pad_batch([c[0] for c in chunk], tok.pad_id, "right", [c[1] for c in chunk])
                    losses.append(lm_loss(model, ids.to(device), attn.to(device), lm.to(device)).item())
        model.train()
        return sum(losses) / len(losses)

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    model.train()
    pbar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc=cfg.mode, dynamic_ncols=True)
    t0, tokens = time.time(), 0
    for step in pbar:
        torch.manual_seed(cfg.seed + step)  # dropout masks: a function of the step, for --resume
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for a, b, c in micro_batches(step):
            with autocast(device):
                loss = stream_loss(train_model, a, b) if c is None else lm_loss(train_model, a, None, c)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens += a.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pbar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
        row = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm}
        last = step + 1 == cfg.max_steps
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            row["eval_loss"] = evaluate()
            row["tokens_per_s"] = tokens / (time.time() - t0)
            tqdm.write(f"step {step + 1}: loss {total:.4f} eval_loss {row['eval_loss']:.4f} "
                       f"({row['tokens_per_s']:.0f} tok/s)")
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save(model, tok, cfg, optimizer, step + 1)
    print(f"saved {ckpt_dir}")
    return ckpt_dir


if __name__ == "__main__":
    main(parse_config(SFTConfig, __doc__))

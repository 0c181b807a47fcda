"""Language-model pretraining (M0) and supervised fine-tuning (M1, the SFT baseline).

  pretrain : next-token loss on every token of a document stream. From scratch on the task
             world's noisy "web" corpus this makes the base model M0 (a tokenizer is trained
             first, on the same corpus).
  sft      : next-token loss on the assistant reply only (the prompt is masked), on
             demonstrations in the chat template. InstructGPT's SFT step; in Self-Rewarding LMs
             M1 = SFT on instruction data (IFT) + judge data (EFT), the baseline = IFT alone.

    python sft.py --mode pretrain --out_dir runs/m0
    python sft.py --mode sft --init runs/m0/model --out_dir runs/m1            # world IFT+EFT
    python sft.py --mode sft --init runs/m0/model --out_dir runs/sft --n_eft 0 # IFT alone
    python sft.py --mode sft --init path/to/hf_model --data my.jsonl --out_dir runs/mine

Output: out_dir/model/ (a checkpoint in the HF layout, with tokenizer.json, the resolved
config and the trainer state for --resume) and out_dir/metrics.jsonl.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import judge
import tasks
from data import (Tokenizer, UserError, encode_chat, encode_documents, load_sft_data, pad_batch,
                  show_supervision, stream_batch, train_tokenizer)
from checkpoint import load_checkpoint
from model import ModelConfig, Transformer, autocast
from train_utils import (OptimFlags, OutDir, RunFlags, all_sum, check_finite, check_ranges, check_same_on_all_ranks,
                         cli, configure_optimizer, data_parallel, get_device, global_batch, init_distributed, is_main,
                         lr_schedule, no_bars, optim_ranges, rank, rank_batch, total_steps, world_size)


# -----------------------------------------------------------------------------
# Loss


def lm_loss(model, input_ids, attention_mask, loss_mask):
    """Mean next-token cross-entropy over supervised targets.
    The logits at column t predict the token at t+1, so the targets are input_ids[:, 1:] and
    a target counts where loss_mask[:, 1:] is 1 (in SFT: the reply and its EOS)."""
    # --- exercise: sft_loss ---
    logits = model(input_ids, attention_mask=attention_mask)  # (B, T, V)
    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    # --- end exercise ---


def pretrain_loss(model, x, y):
    """Mean next-token cross-entropy on every token of pretraining windows x, y (B, T) (y is x
    shifted by one token): M0's objective, and PPO-ptx's."""
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def backward(model, batches, device) -> float:
    """Backpropagate one optimiser step's micro-batches [(x, y, None) for pretraining windows,
    (ids, None, loss_mask) for SFT]; returns the step's loss.

    Gradient accumulation: the step's loss is the mean over ALL its targets, so each
    micro-batch counts by its share of them. (In SFT replies differ in length; a plain mean
    of micro-batch means would make batch 1 x accum 2 differ from batch 2 x accum 1.) Under
    torchrun the share is of all ranks' targets, and DDP's mean over the N ranks is undone by
    x N: N ranks x batch b take the step one process takes with batch N·b."""
    counts = [y.numel() if m is None else int(m[:, 1:].sum()) for x, y, m in batches]
    n_all, ranks = all_sum(sum(counts)), world_size()
    total = 0.0
    for (x, y, m), n in zip(batches, counts):
        if n == 0:  # never in SFT (a reply's EOS is supervised); under torchrun a skip would hang the other ranks
            continue
        with autocast(device):
            loss = pretrain_loss(model, x, y) if m is None else lm_loss(model, x, None, m)
        weight = n * ranks / n_all
        (loss * weight).backward()
        total += loss.item() * (weight / ranks)
    return all_sum(total)


# -----------------------------------------------------------------------------
# Data


def world_corpus(cfg: SFTConfig) -> tuple[list[str], list[str]]:
    """The world's noisy "web" as plain text. It never shows the chat template: as with a real
    base model, M0 meets <|im_start|>/<|im_end|> first in SFT, which teaches the format."""
    docs = tasks.pretrain_corpus(cfg.world_seed, cfg.corpus_docs)
    n_eval = max(1, int(len(docs) * cfg.eval_frac))
    return docs[n_eval:], docs[:n_eval]


def text_corpus(path: str, eval_frac: float) -> tuple[list[str], list[str]]:
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file (pretraining reads a .txt file)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte offset {e.start}); save the file as UTF-8") from None
    if len(docs) < 2:
        raise UserError(f"{path}: need at least 2 documents (separated by blank lines)")
    n_eval = max(1, int(len(docs) * eval_frac))
    return docs[n_eval:], docs[:n_eval]


def world_examples(cfg: SFTConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) pairs of (prompt, response): IFT demonstrations and EFT judge examples.
    Eval pairs come from other seeds, so the eval loss is on unseen examples."""
    train = tasks.ift_seed(cfg.world_seed + 1, cfg.n_ift)
    evals = tasks.ift_seed(cfg.world_seed + 101, max(16, cfg.n_ift // 10))
    if cfg.n_eft:
        train += eft_examples(cfg, cfg.world_seed + 2, cfg.n_eft, policy_responses(cfg))
        evals += eft_examples(cfg, cfg.world_seed + 102, max(16, cfg.n_eft // 10))
    return train, evals


def eft_examples(cfg: SFTConfig, seed: int, n: int, pool=None) -> list[tuple[str, str]]:
    """(filled judge prompt, judge target) pairs of the world's EFT data, in --judge_prompt's
    template (a reference-guided template gets examples with a reference answer, a pairwise
    one pairs of responses to one question)."""
    template = judge.load_judge_template(cfg.judge_prompt or None)
    if judge.is_pairwise(template):  # two responses to one question (from an EFT group), a verdict between them
        if judge.is_reference_guided(template):
            raise UserError(f"{cfg.judge_prompt}: a pairwise judge takes no reference answer")
        # (SFTConfig asks M1 for --eft_group >= 2; M0's tokenizer corpus, eft_group 1, gets pairs of groups of 2)
        return [(judge.fill(template, q, ab), target)
                for q, ab, target in tasks.eft_pairs(seed, n, max(2, cfg.eft_group), pool)]
    reference = judge.is_reference_guided(template)
    return [(judge.fill(template, q, r, *ref), target)
            for q, r, target, *ref in tasks.eft_seed(seed, n, pool, reference=reference, group=cfg.eft_group)]


def policy_responses(cfg: SFTConfig):
    """(task, response) pairs sampled from cfg.eft_policy (T = 0.7) on training tasks: the
    mistakes the judge will have to recognise in the self-rewarding loop. None without it."""
    if not cfg.eft_policy:
        return None
    from sampling import sample_responses

    model, tok = load_checkpoint(cfg.eft_policy, get_device(cfg.device))
    rng = random.Random(f"eft-policy/{cfg.world_seed}")
    todo = [tasks.sample_task(rng, split="train") for _ in range(cfg.n_eft)]
    gen = torch.Generator(get_device(cfg.device)).manual_seed(cfg.seed)
    samples, _ = sample_responses(model.eval(), tok, [t.prompt for t in todo], 2, 0.7, 0.9, 40, generator=gen,
                                  desc="EFT responses", return_finished=True)  # raw text, as the loop judges it
    return [(t, r) for t, rs in zip(todo, samples) for r in rs if r is not None]


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
        raise UserError(f"{what}: no example fits in {max_len} tokens")
    return kept


def sft_batch(examples, batch_size: int, seed: int, i: int, pad_id: int):
    """The i-th batch of shuffled, right-padded examples (see data.epoch_batch; under torchrun
    this rank's part of the global batch, train_utils.rank_batch)."""
    chunk = [examples[k] for k in rank_batch(len(examples), batch_size, seed, i)]
    return pad_batch([c[0] for c in chunk], pad_id, "right", [c[1] for c in chunk])


# -----------------------------------------------------------------------------
# Config


@dataclass
class SFTConfig(RunFlags, OptimFlags):
    # what to train
    mode: str = "sft"  # pretrain: loss on every token; sft: loss on the response only
    init: str = ""  # checkpoint directory to start from; pretraining without it starts from scratch
    data: str = ""  # sft: a JSONL file in any data.py format; pretrain: a .txt file (blank-line separated documents); empty: the task world
    eval_frac: float = 0.05  # share of --data held out for the evaluation loss
    system: str = ""  # a system message for every prompt (default: none; a real model's template may add its own)
    show_example: bool = True  # print one training example with its supervised part marked
    # the task world (when --data is empty)
    world_seed: int = 0  # the world's data are generated from this seed
    corpus_docs: int = 20000  # pretrain: documents in the noisy corpus
    n_ift: int = 400  # sft: instruction-following demonstrations
    n_eft: int = 400  # sft: judge demonstrations (0 for the SFT baseline)
    eft_policy: str = ""  # sft: a checkpoint whose own responses (graded by the oracle) make half of the EFT examples
    judge_prompt: str = ""  # sft: the judge template of the EFT examples; empty: judge_prompt.txt
    eft_group: int = 1  # sft: responses per EFT question; > 1: one question with several responses of different scores
    # model shape when pretraining from scratch
    vocab_size: int = 1024  # BPE vocabulary, trained on the corpus
    dim: int = 128  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (< n_heads: grouped-query attention)
    max_seq_len: int = 0  # context length; 0: the checkpoint's own (--init), or 256 from scratch
    seq_len: int = 128  # pretrain: tokens per training window
    # run
    out_dir: str = "runs/sft"
    eval_every: int = 100
    eval_batches: int = 8  # held-out batches per evaluation
    # optimisation
    batch_size: int = 32
    lr: float = 1e-3  # (the paper: 5.5e-6, decaying to 1.1e-6)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    dropout: float = 0.1  # the paper's SFT dropout

    def __post_init__(self):
        c = self
        check_ranges(c, {
            **optim_ranges(c),
            "mode": (c.mode in ("pretrain", "sft"), "pretrain or sft"), "seq_len": (c.seq_len >= 2, ">= 2"),
            "eval_frac": (0 <= c.eval_frac < 1, "in [0, 1)"), "eval_batches": (c.eval_batches >= 1, ">= 1"),
            "corpus_docs": (c.corpus_docs >= 2, ">= 2"), "n_ift": (c.n_ift >= 1, ">= 1"),
            "n_eft": (c.n_eft >= 0, ">= 0"), "eft_group": (1 <= c.eft_group <= 6, "in 1..6"),
            "vocab_size": (c.vocab_size >= 260, ">= 260: 256 bytes and 4 special tokens"),
            "dim": (c.dim >= 1 and c.dim % c.n_heads == 0, "a multiple of --n_heads"),
            "n_heads": (c.n_heads >= 1 and c.n_heads % max(1, c.n_kv_heads) == 0, "a multiple of --n_kv_heads"),
            "n_kv_heads": (c.n_kv_heads >= 1, ">= 1"), "n_layers": (c.n_layers >= 1, ">= 1"),
            "max_seq_len": (c.max_seq_len >= 0, ">= 0"),
        })
        if c.mode == "sft" and c.n_eft and c.eft_group < 2 and judge.is_pairwise_file(c.judge_prompt):
            raise UserError(f"--judge_prompt {c.judge_prompt} is pairwise: its EFT pairs come from groups, --eft_group 2 or more")


# -----------------------------------------------------------------------------
# Main


def main(cfg: SFTConfig) -> str:
    """Train; returns the checkpoint directory."""
    device = init_distributed(cfg.device)  # get_device, and under torchrun the process group
    torch.manual_seed(cfg.seed)

    # data first: a bad file fails here, before any model is built or anything is written
    if cfg.mode == "pretrain":
        train_docs, eval_docs = text_corpus(cfg.data, cfg.eval_frac) if cfg.data else world_corpus(cfg)
    else:
        train_pairs, eval_pairs = file_examples(cfg.data, cfg.eval_frac, cfg.seed) if cfg.data else world_examples(cfg)
    if cfg.mode == "sft" and not cfg.init and not cfg.resume:
        raise UserError("sft needs --init (a pretrained checkpoint directory)")
    out = OutDir(cfg, {"--data": cfg.data, "--init": cfg.init, "--eft_policy": cfg.eft_policy})  # nothing in out_dir is touched before out.start()
    ckpt_dir = out.ckpt

    # tokenizer and model
    start_from = ckpt_dir if cfg.resume else cfg.init
    if start_from:
        overrides = {"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}
        model, tok = load_checkpoint(start_from, dropout=cfg.dropout, **overrides)
        tok.system = cfg.system or None
    else:
        texts = list(train_docs)
        if not cfg.data:
            # the judge's words (rubric, reason lines) must get tokens of their own, or a
            # judge prompt and its answer do not fit the context
            texts += [p + "\n" + target for p, target in eft_examples(cfg, cfg.world_seed + 5, 300)]
        tok = train_tokenizer(texts, cfg.vocab_size)
        model = Transformer(ModelConfig(
            vocab_size=tok.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.max_seq_len or 256, dropout=cfg.dropout,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    model.to(device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, device {device}")

    if cfg.mode == "pretrain":
        if cfg.seq_len > model.config.max_seq_len:
            raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's context ({model.config.max_seq_len})")
        train_stream = encode_documents(tok, train_docs)
        eval_stream = encode_documents(tok, eval_docs)
        if len(train_stream) <= cfg.seq_len + 1:
            raise UserError(f"the corpus has {len(train_stream)} tokens, fewer than one --seq_len {cfg.seq_len} window")
        if len(eval_stream) <= cfg.seq_len + 1:
            eval_stream = train_stream  # tiny user corpora: evaluate on training text
        max_steps = total_steps(cfg, len(train_stream) // cfg.seq_len)  # an epoch: every token once, in windows
        check_same_on_all_ranks("the tokenized corpus", (max_steps, len(train_stream), tok.vocab_size))
        print(f"corpus: {len(train_docs)} documents, {len(train_stream)} tokens (eval {len(eval_stream)}); "
              f"{max_steps} steps of {global_batch(cfg)} windows of {cfg.seq_len} tokens")
    else:
        max_len = model.config.max_seq_len
        train_ex = encode_examples(tok, train_pairs, max_len, "train")
        eval_ex = encode_examples(tok, eval_pairs, max_len, "eval", required=False)
        if not eval_ex:
            print("eval: no held-out example fits the context; the eval loss uses training examples")
            eval_ex = train_ex[: cfg.batch_size]
        if cfg.batch_size * world_size() > len(train_ex):
            raise UserError(f"--batch_size {cfg.batch_size} x {world_size()} rank(s) > {len(train_ex)} "
                            "training examples")
        max_steps = total_steps(cfg, len(train_ex))
        check_same_on_all_ranks("the training examples", (max_steps, train_ex))
        n_sup = sum(sum(m) for _, m in train_ex)
        print(f"sft: {len(train_ex)} examples, {n_sup} supervised tokens; {max_steps} steps of "
              f"{global_batch(cfg)} ({max_steps * global_batch(cfg) / len(train_ex):.1f} epochs)")
        if cfg.show_example:
            print("one example, the unsupervised part in ⟦ ⟧:\n" + show_supervision(tok, *train_ex[0]))

    out.start()  # data and models checked: from here on the run writes into out_dir
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), device)
    step = 0
    if cfg.resume:
        step = out.load_state(optimizer, device)["step"]
        print(f"resumed at step {step}")
        if step >= max_steps:
            print(f"nothing to do: the checkpoint is at step {step} of {max_steps}")
            out.close()
            return ckpt_dir
    train_model = data_parallel(model, device)  # DDP under torchrun; `model` is saved and evaluated
    train_model = torch.compile(train_model) if cfg.compile else train_model

    def micro_batches(step):
        """The grad_accum micro-batches of an optimizer step, a pure function of the step
        (so --resume continues exactly where the run stopped)."""
        out = []
        for k in range(cfg.grad_accum):
            i = step * cfg.grad_accum + k
            if cfg.mode == "pretrain":
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
                x, y = stream_batch(train_stream, cfg.batch_size * world_size(), cfg.seq_len, gen)
                part = slice(rank() * cfg.batch_size, (rank() + 1) * cfg.batch_size)  # this rank's windows
                out.append((x[part].to(device), y[part].to(device), None))
            else:
                ids, _, loss_mask = sft_batch(train_ex, cfg.batch_size, cfg.seed, i, tok.pad_id)
                # right padding: plain causal attention is exact for the real tokens
                out.append((ids.to(device), None, loss_mask.to(device)))
        return out

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = []
        gen = torch.Generator().manual_seed(12345)
        for k in range(cfg.eval_batches):
            with autocast(device):
                if cfg.mode == "pretrain":
                    x, y = stream_batch(eval_stream, cfg.batch_size, cfg.seq_len, gen)
                    losses.append(pretrain_loss(model, x.to(device), y.to(device)).item())
                else:
                    chunk = eval_ex[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                    if not chunk:
                        break
                    ids, attn, lm = pad_batch([c[0] for c in chunk], tok.pad_id, "right", [c[1] for c in chunk])
                    losses.append(lm_loss(model, ids.to(device), attn.to(device), lm.to(device)).item())
        model.train()
        return sum(losses) / len(losses)

    model.train()
    pbar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc=cfg.mode, dynamic_ncols=True,
                disable=no_bars())
    t0, tokens = time.time(), 0
    for step in pbar:
        # dropout masks: a function of the step (for --resume) and of the rank
        torch.manual_seed(cfg.seed + step + 1_000_003 * rank())
        lr = lr_schedule(step, cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batches = micro_batches(step)
        total = backward(train_model, batches, device)
        tokens += sum(a.numel() for a, _, _ in batches) * world_size()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        check_finite(step + 1, cfg.out_dir, loss=total, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pbar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
        row = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm}
        last = step + 1 == max_steps
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and is_main():
            row["eval_loss"] = evaluate()
            check_finite(step + 1, cfg.out_dir, eval_loss=row["eval_loss"])
            row["tokens_per_s"] = tokens / (time.time() - t0)
            tqdm.write(f"step {step + 1}: loss {total:.4f} eval_loss {row['eval_loss']:.4f} "
                       f"({row['tokens_per_s']:.0f} tok/s)")
        out.log(row)
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            out.save(model, tok, optimizer, step + 1)
    out.close()
    print(f"saved {ckpt_dir}")
    return ckpt_dir


if __name__ == "__main__":
    cli(main, SFTConfig, __doc__)



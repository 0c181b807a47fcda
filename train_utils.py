"""What every trainer shares and no paper describes: flags, devices, run directories, the
optimiser and its schedule, metrics.

  - `parse_config`, `cli`     a config dataclass becomes the script's flags; a user's mistake is
                              one line (`error: ...`, exit 2), a bug keeps its traceback
  - `check_ranges`            refuse out-of-range flags, all at once, by name
  - `get_device`              cuda > mps > cpu, or the named one
  - `init_distributed`, `data_parallel`, `rank_batch`, `all_sum`, `all_mean`   torchrun: DDP,
                              each rank's share of a batch, statistics over all ranks
  - `OutDir`                  a trainer's out_dir: locked while it runs, nothing touched before
                              the run's checks pass, --resume checked against flags and inputs
  - `configure_optimizer`, `lr_schedule`   AdamW (decay on matrices only), warm-up + linear decay
  - `check_finite`, `log_metrics`          stop at NaN/inf; one JSON line per step
  - `Run`, `stage_seed`, `check_run_dir`   self_reward.py's run directory: each step's result a
                              file, reused when a killed run is started again
(The trainers' resumable checkpoints are in checkpoint.py.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, fields

import torch

from data import UserError, read_json, read_jsonl, write_json, write_jsonl


# -----------------------------------------------------------------------------
# Flags: one vocabulary for every script
#
# A script's config is a dataclass; each field is a flag (--name), its trailing comment the
# flag's help, and a comment line above a run of fields the heading they are listed under in
# --help. The flags every trainer shares are defined once, here; a trainer's config extends
# these classes and may redeclare a field to give it another default.


@dataclass
class RunFlags:
    # run
    out_dir: str = "runs/out"  # the run's directory: out_dir/model (the checkpoint), metrics.jsonl, reports
    seed: int = 1337  # every random draw of the run derives from it
    device: str = "auto"  # auto: cuda > mps > cpu; or cpu, cuda, cuda:1, mps
    compile: bool = False  # torch.compile the trained model
    resume: bool = False  # continue the run saved in out_dir (same settings; --max_steps may grow)
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run
    eval_every: int = 50  # steps between held-out evaluations (0: none)
    save_every: int = 0  # steps between checkpoints (0: only at the end)


@dataclass
class OptimFlags:
    # optimisation
    batch_size: int = 16  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    epochs: float = 1.0  # passes over the training data (unless --max_steps)
    max_steps: int = 0  # optimiser steps; 0: from --epochs
    lr: float = 1e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # after warm-up the rate decays linearly to lr * min_lr_ratio at the last step
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW decay, on matrices only (not on norms and biases)
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # the global gradient norm is clipped to this
    dropout: float = 0.0  # on attention and residual branches while training


@dataclass
class SamplingFlags:
    # sampling
    temperature: float = 0.7  # softmax temperature (0: greedy)
    top_p: float = 0.9  # nucleus sampling: keep the most likely tokens up to this probability mass
    top_k: int = 0  # keep only the k most likely tokens (0: all)
    max_new_tokens: int = 40  # the response's token budget (the prompt's length is separate)


def optim_ranges(c) -> dict:
    """check_ranges rules of OptimFlags."""
    return {"batch_size": (c.batch_size >= 1, ">= 1"), "grad_accum": (c.grad_accum >= 1, ">= 1"),
            "epochs": (c.epochs > 0, "> 0"), "max_steps": (c.max_steps >= 0, ">= 0"),
            "lr": (c.lr > 0, "> 0"), "min_lr_ratio": (0 <= c.min_lr_ratio <= 1, "in [0, 1]"),
            "warmup_steps": (c.warmup_steps >= 0, ">= 0"), "weight_decay": (c.weight_decay >= 0, ">= 0"),
            "adam_beta1": (0 <= c.adam_beta1 < 1, "in [0, 1)"), "adam_beta2": (0 <= c.adam_beta2 < 1, "in [0, 1)"),
            "grad_clip": (c.grad_clip > 0, "> 0"), "dropout": (0 <= c.dropout < 1, "in [0, 1)"),
            "eval_every": (c.eval_every >= 0, ">= 0"), "save_every": (c.save_every >= 0, ">= 0")}


def sampling_ranges(c) -> dict:
    """check_ranges rules of SamplingFlags."""
    return {"temperature": (c.temperature >= 0, ">= 0"), "top_p": (0 < c.top_p <= 1, "in (0, 1]"),
            "top_k": (c.top_k >= 0, ">= 0"), "max_new_tokens": (c.max_new_tokens >= 1, ">= 1")}


# Flags that were renamed: the old spelling is refused with the new one named.
RENAMED = {"min_lr": "--min_lr_ratio (the final learning rate as a fraction of --lr)",
           "beta1": "--adam_beta1", "beta2": "--adam_beta2", "n_eval_world": "--n_eval",
           "world_pairs": "--world_prompts (prompts, two samples each; the pairs are those the oracle tells apart)",
           "ift": "--n_ift", "eft": "--n_eft"}


def field_docs(cls) -> dict:
    """{field: (heading, help)} read from the config classes' source (see the comment above)."""
    import inspect
    import re

    docs = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()[1:]
        except (OSError, TypeError):
            continue
        heading = "options"
        for line in lines:
            text = line.strip()
            if line.startswith("    def ") or line.startswith("    @"):
                break
            if text.startswith("#"):
                heading = text.lstrip("# ").strip()
                continue
            m = re.match(r"(\w+)\s*:\s*[^=]+=.*?(?:\s+#\s*(.*))?$", text)
            if m and m.group(1) in cls.__dataclass_fields__:
                if m.group(1) in docs:  # a base's field given another default here: its help, and this note
                    old_heading, old_help = docs[m.group(1)]
                    docs[m.group(1)] = (old_heading, "; ".join(filter(None, [old_help, m.group(2)])))
                else:
                    docs[m.group(1)] = (heading, m.group(2) or "")
    return docs


def parse_config(cls, description: str = "", defaults=None, argv=None):
    """Command-line flags that mirror a config dataclass: one --flag per field, typed by its
    default (bools as --flag / --no-flag), with its help and heading from field_docs. Every
    script uses this, so a flag is always spelled as the field it sets. A renamed flag's old
    spelling is refused, naming the new one."""
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else argv
    names = {f.name for f in fields(cls)}
    for arg in argv:
        old = arg[2:].split("=")[0].removeprefix("no-") if arg.startswith("--") else None
        if old in RENAMED and old not in names:
            raise UserError(f"--{old} was renamed: use {RENAMED[old]}")
    defaults = defaults or cls()
    docs = field_docs(cls)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    inherited = {f for base in cls.__mro__[1:] for f in getattr(base, "__dataclass_fields__", {})}
    own = [h for f, (h, _) in docs.items() if f not in inherited]
    for heading in dict.fromkeys(own + [h for h, _ in docs.values()]):  # the script's own headings first
        groups[heading] = p.add_argument_group(heading)
    for f in fields(cls):
        v = getattr(defaults, f.name)
        heading, text = docs.get(f.name, ("options", ""))
        group = groups.setdefault(heading, p.add_argument_group(heading))
        shown = f"{text} (default: {v!r})" if text else f"(default: {v!r})"
        if isinstance(v, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=v, help=shown)
        else:
            group.add_argument(f"--{f.name}", type=type(v), default=v, help=shown, metavar=type(v).__name__.upper())
    return cls(**vars(p.parse_args(argv)))


def cli(main, cls, description: str = "", defaults=None):
    """Run a script: flags -> config -> main(config). A user's mistake (UserError: a bad flag,
    file or checkpoint) is printed as one line and exits with status 2; a bug keeps its
    traceback."""
    import sys

    try:
        result = main(parse_config(cls, description, defaults))
        finish_distributed()
        return result
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_ranges(cfg, rules: dict):
    """rules: {flag: (ok, what it must be)}. Raises one UserError listing every flag that is
    out of range, so a user fixes them all at once. Every float flag must also be finite
    (nan and inf pass most comparisons, or fail them with a misleading message later)."""
    bad = [f"--{f.name} {getattr(cfg, f.name)!r} (must be a finite number)" for f in fields(cfg)
           if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]
    bad += [f"--{name} {getattr(cfg, name)!r} (must be {what})" for name, (ok, what) in rules.items()
            if not ok and f"--{name} " not in " ".join(bad)]
    if bad:
        raise UserError("invalid flag(s): " + "; ".join(bad))


# -----------------------------------------------------------------------------
# Devices


def get_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is named; a named device that is not there is a user
    error, caught before anything is written."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device name (try auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU (use --device auto or cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available here (use --device auto or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# Data parallel: `torchrun --nproc_per_node N script.py ...`
#
# PyTorch's DistributedDataParallel does the work: every process (rank) holds the whole model,
# takes its part of each global batch, and DDP averages the gradients across ranks inside
# backward(), so every rank takes the same optimizer step. --batch_size is per rank: a step
# sees batch_size x grad_accum x N examples. Rank 0 alone writes (checkpoints, metrics, reports)
# and evaluates; the others train. Without torchrun (WORLD_SIZE unset) all of this is a no-op.


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def no_bars() -> bool:
    """Progress bars off: on every rank but 0, and wherever TQDM_DISABLE is set (a bar given
    an explicit disable= no longer reads that variable itself)."""
    return not is_main() or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def init_distributed(name: str = "auto") -> torch.device:
    """This process's device. Under torchrun (WORLD_SIZE > 1) it first joins the process group:
    nccl with one GPU per rank (cuda:LOCAL_RANK), gloo on the CPU."""
    device = get_device(name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun: --device {name} has no process-group backend here; use cuda or cpu")
    if not torch.distributed.is_initialized():
        import datetime

        # rank 0 evaluates and writes reports alone while the others wait at the next collective:
        # allow that longer than the backends' defaults (10-30 min)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=2))
    if rank() != 0:
        import sys

        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    return device


def data_parallel(model, device, unused_parameters: bool = False):
    """The model as trained: wrapped in DDP under torchrun, else itself. Keep the unwrapped
    model for saving, evaluation and sampling (no gradient sync there). unused_parameters: some
    parameters get no gradient (a reward or value model never uses an untied LM head)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters)


def unwrap(model):
    """The model inside a DDP wrapper (the model itself otherwise; None stays None)."""
    return getattr(model, "module", model)


def all_sum(x):
    """The sum over ranks of a number or tensor (a float tensor comes back; itself on one process)."""
    if world_size() == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu() if isinstance(x, torch.Tensor) else t.item()


def all_mean(stats: dict) -> dict:
    """Per-rank statistics averaged over ranks (every rank gets the same dict back), so a
    logged loss, accuracy or KL is the global batch's, and any decision made from one (PPO's
    adaptive KL coefficient) is the same on every rank. A statistic some ranks lack (no
    finished response there) is the mean over the ranks that have it."""
    if world_size() == 1:
        return stats
    mine = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = sorted(set().union(*gather_rows([list(mine)])))  # the same keys, in the same order, everywhere
    sums = all_sum(torch.tensor([[mine.get(k, 0.0), float(k in mine)] for k in keys], dtype=torch.float64))
    return {**stats, **{k: (sums[i, 0] / sums[i, 1]).item() for i, k in enumerate(keys)}}


def check_same_on_all_ranks(what: str, value):
    """Stop when the ranks computed different `value`s from what each derived by itself (the
    same seed on every rank: sampled training data, step counts). Ranks that disagree would
    train on different data or take different numbers of steps, and hang."""
    if world_size() == 1:
        return
    import hashlib

    h = hashlib.sha256()
    for part in value if isinstance(value, tuple) else (value,):
        for item in part if isinstance(part, list) else (part,):  # a dataset: one example at a time
            h.update(repr(item).encode())
    if len(set(gather_rows([h.hexdigest()[:16]]))) > 1:
        raise UserError(f"{what} differs between ranks (sampling is not deterministic across these devices); "
                        "make it once in one process (e.g. --data) and train on the file")


def rank_batch(n: int, batch_size: int, seed: int, i: int) -> list[int]:
    """This rank's batch_size indices of the i-th global batch of n shuffled items (the global
    batch is data.epoch_batch's with batch_size x N items): together the ranks see each item
    once per epoch, as one process with batch_size x N would, in the same order."""
    from data import epoch_batch

    r = rank()
    return epoch_batch(n, batch_size * world_size(), seed, i)[r * batch_size : (r + 1) * batch_size]


def gather_rows(rows: list) -> list:
    """Every rank's rows, concatenated in rank order, on every rank (sampled data shared)."""
    if world_size() == 1:
        return rows
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def finish_distributed():
    """Leave the process group at the end of a script (every rank reaches here)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# A training run


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: training stops before the bad step can be saved."""


def check_finite(step: int, out_dir: str, **values):
    """Stop on NaN/inf with the step and the quantity named; the last checkpoint is kept
    (nothing is saved after a bad step). JSON cannot even write NaN (metrics.jsonl)."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"step {step}: {name} is {v}; training stopped and nothing was saved for this step "
                f"(the last checkpoint in {out_dir} is kept). Lower --lr, check --init's weights "
                f"and the data, then start again or --resume")


def configure_optimizer(model, lr: float, weight_decay: float, betas, device):
    """AdamW with weight decay on matrices only (embeddings and linear weights), not on norms
    and biases, as in GPT-2 / Llama training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def global_batch(cfg) -> int:
    """Examples per optimiser step: batch_size x grad_accum on each of the ranks."""
    return cfg.batch_size * cfg.grad_accum * world_size()


def total_steps(cfg, n_examples: int) -> int:
    """The run's optimiser steps: --max_steps, or --epochs passes over n_examples in steps of
    batch_size x grad_accum x ranks examples (an epoch's last partial batch is skipped)."""
    per_epoch = max(1, n_examples // global_batch(cfg))
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def lr_schedule(step: int, lr: float, min_lr_ratio: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over warmup_steps, then linear decay from lr to lr * min_lr_ratio at max_steps."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr + (min_lr - lr) * min(1.0, frac)


# Flags that may change between a run and its --resume: they do not change what is computed.
RESUMABLE_CHANGES = {"resume", "overwrite", "device", "compile", "save_every", "eval_every", "show_example"}


class OutDir:
    """A training run's directory, owned by one run at a time:

        out_dir/model/         the checkpoint (HF layout) + train_config.json + trainer_state.pt
        out_dir/metrics.jsonl  one JSON line per step
        out_dir/.lock          held (flock) while a run works here

    Made before anything is trained and before anything in out_dir is touched: it refuses an
    out_dir that is a file, cannot be written, is in use by a live run (the lock dies with its
    process, so a killed run never blocks the next one), or holds an earlier run (unless
    --overwrite or --resume), and a --resume whose settings or input files changed. A save
    interrupted by a kill is finished or undone here (checkpoint.recover_dir). Nothing of an
    earlier run is deleted until `start()`, which a trainer calls once its data and models
    have been read and checked."""

    def __init__(self, cfg, inputs: dict[str, str]):
        """inputs: {flag: path} of every input file or checkpoint (empty paths are skipped);
        their digests are recorded, and a --resume refuses when one has changed."""
        self.cfg, self.path = cfg, cfg.out_dir
        self.started, self.pending = False, {}
        self.ckpt = os.path.join(self.path, "model")
        self.metrics = os.path.join(self.path, "metrics.jsonl")
        self.state_file = os.path.join(self.ckpt, "trainer_state.pt")
        if cfg.resume and cfg.overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--out_dir {self.path} is a file")
        for flag, p in inputs.items():
            if p and not os.path.exists(p):
                raise UserError(f"{flag} {p}: no such file or directory")
        self.inputs = {flag: digest(p) for flag, p in inputs.items() if p}
        self.main = is_main()  # under torchrun only rank 0 writes; every rank runs the checks
        if self.main:
            claim_dir(self.path, "--out_dir")
            from checkpoint import recover_dir

            recover_dir(self.ckpt)  # a save a kill interrupted: finished or undone
        barrier()
        if cfg.resume:
            if not os.path.exists(self.state_file):
                raise UserError(f"--resume: no checkpoint with trainer state in {self.ckpt}")
            saved = read_json(os.path.join(self.ckpt, "train_config.json"))
            now = dataclasses.asdict(cfg)
            changed = {k: (saved.get(k), v) for k, v in now.items()
                       if k not in RESUMABLE_CHANGES | {"max_steps", "epochs"} and saved.get(k) != v}
            if changed:
                raise UserError(f"--resume: {self.ckpt} was trained with other settings {changed} (saved, now); "
                                "resume with the same flags, or start a new run in another --out_dir")
            if saved.get("_ranks", 1) != world_size():
                raise UserError(f"--resume: {self.ckpt} was trained on {saved.get('_ranks', 1)} rank(s), this run has "
                                f"{world_size()}: the batches would change; resume with the same --nproc_per_node")
            for flag, d in saved.get("_inputs", {}).items():
                if self.inputs.get(flag, d) != d:
                    raise UserError(f"--resume: {flag} {getattr(cfg, flag.lstrip('-'), '')} has changed since the run "
                                    "started (its contents differ); resume with the same inputs, or start a new run")
        elif (os.path.exists(self.metrics) or os.path.exists(self.state_file)) and not cfg.overwrite:
            raise UserError(f"--out_dir {self.path} holds an earlier run; use --resume to continue it, "
                            "--overwrite to start afresh there, or another --out_dir")

    def start(self):
        """--overwrite: the earlier run's metrics and trainer state go now, when everything has
        been checked (its weights stay until the first save replaces them); the rows kept with
        `write_rows` before now are written."""
        self.started = True
        if not self.main:
            return
        if not self.cfg.resume:
            for f in (self.metrics, self.state_file):
                if os.path.exists(f):
                    os.remove(f)
        for name, rows in self.pending.items():
            write_jsonl(os.path.join(self.path, name), rows)

    def write_rows(self, name: str, rows: list):
        """out_dir/name as JSONL (data the run sampled, read back by --resume); before start()
        it waits, so a run that fails its checks overwrites nothing."""
        if self.started:
            if self.main:
                write_jsonl(os.path.join(self.path, name), rows)
        else:
            self.pending[name] = rows

    def save(self, model, tok, optimizer, step: int, extra_state: dict | None = None):
        """out_dir/model: weights (their header records the step), tokenizer, the resolved
        config with the input digests, and the trainer state for --resume. The directory is
        written whole under a temporary name and then switched in (checkpoint.save_dir), so a
        kill leaves the previous checkpoint or this one, never a mix."""
        if not self.main:
            return
        import io

        from checkpoint import save_dir

        buf = io.BytesIO()
        torch.save({"step": step, "optimizer": optimizer.state_dict(), **(extra_state or {})}, buf)
        config = {**dataclasses.asdict(self.cfg), "_inputs": self.inputs, "_ranks": world_size()}
        save_dir(self.ckpt, lambda d: model.save_pretrained(d, tok, extra_files={
            "train_config.json": json.dumps(config, indent=2), "trainer_state.pt": buf.getvalue()},
            metadata={"step": str(step)}))

    def load_state(self, optimizer, device) -> dict:
        """The trainer state saved beside the weights (optimizer restored in place). Refuses a
        checkpoint whose weights and state come from two different saves, and drops the metrics
        rows logged after the checkpoint (they are redone)."""
        from checkpoint import checkpoint_metadata

        state = torch.load(self.state_file, map_location=device, weights_only=True)
        weights_step = checkpoint_metadata(self.ckpt).get("step")
        if weights_step is not None and int(weights_step) != state["step"]:
            raise UserError(f"{self.ckpt}: the weights are from step {weights_step} but the trainer state from "
                            f"step {state['step']} (two saves were mixed); start again with --overwrite")
        optimizer.load_state_dict(state["optimizer"])
        if self.main and os.path.exists(self.metrics):
            with open(self.metrics) as f:
                rows = [json.loads(r) for r in f if r.strip()]
            write_jsonl(self.metrics, [r for r in rows if r["step"] <= state["step"]])
        return state

    def log(self, row: dict):
        """Append one row to metrics.jsonl (strict JSON: NaN never gets here)."""
        if not self.main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def close(self):
        if self.main:
            release_dir(self.path)
        barrier()  # the other ranks wait for rank 0's last save


_HELD: dict[str, int] = {}  # directory -> file descriptor of its lock, held by this process


def claim_dir(path: str, what: str):
    """Take path/.lock for this process (exclusive, non-blocking flock), creating path. A second
    process gets a UserError naming the holder; the OS releases the lock when its holder exits,
    killed or not. Re-entrant within one process."""
    import fcntl

    key = os.path.realpath(path)
    if key in _HELD:
        return
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        raise UserError(f"{what} {path}: cannot write there (permission denied)") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be used ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{what} {path} is in use by another run (process {holder}); wait for it to finish, "
                        "or choose another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd


def release_dir(path: str):
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def digest(path: str) -> str:
    """sha256 of a file, or of a checkpoint directory's weight and config files."""
    import hashlib

    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json")) and
        f not in ("train_config.json",)) if os.path.isdir(path) else []
    for f in files:
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# The self-rewarding run directory: every step's result a file, reused on a restart


class Run:
    """The run directory: each step's result is a file under run_dir, written once (atomically);
    a run started again reads it back instead of recomputing, so a killed run resumes at its
    last finished step and draws what it drew before (every step's randomness is seeded by its
    name: `stage_seed`). Seconds per step go to run_dir/times.json."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.times_path = os.path.join(run_dir, "times.json")
        self.times = read_json(self.times_path) if os.path.exists(self.times_path) else {}

    def rows(self, name: str, compute, cache: bool = True) -> list[dict]:
        """run_dir/name (JSONL): compute() -> rows, unless a finished run wrote it before."""
        path = os.path.join(self.run_dir, name)
        if not cache or not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            t0 = time.time()
            write_jsonl(path, compute())
            self._timed(name, t0)
        return read_rows(path)

    def model(self, name: str, train) -> str:
        """run_dir/name/model: train() -> checkpoint, unless it finished before (time.json). An
        unfinished training stage (killed mid-way) is redone from its start."""
        out_dir = os.path.join(self.run_dir, name)
        done = os.path.join(out_dir, "time.json")
        if os.path.exists(done):
            print(f"[{name}] found {out_dir}/model, reusing it")
            return os.path.join(out_dir, "model")
        t0 = time.time()
        path = train()
        write_json(done, {"seconds": time.time() - t0})
        self._timed(name, t0)
        return path

    def _timed(self, name: str, t0: float):
        self.times[name] = time.time() - t0
        write_json(self.times_path, self.times)


def stage_seed(cfg, *names) -> int:
    """A seed per stage, so that a stage run again (after a kill) draws what it drew before,
    whatever ran earlier in the process."""
    return random.Random("/".join(map(str, (cfg.seed, *names)))).randrange(2 ** 31)


def read_rows(path: str) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)] if os.path.getsize(path) else []


def check_run_dir(cfg):
    """Finished stages are reused, so a run_dir holds one configuration only (cfg: a config
    dataclass with a run_dir field, spelled any way: a trailing slash, a relative path). One
    run at a time: the run holds run_dir/.lock (claim_dir)."""
    if os.path.exists(cfg.run_dir) and not os.path.isdir(cfg.run_dir):
        raise UserError(f"--run_dir {cfg.run_dir} is a file")
    claim_dir(cfg.run_dir, "--run_dir")
    cfg_path = os.path.join(cfg.run_dir, "config.json")
    if os.path.exists(cfg_path):
        old = read_json(cfg_path)
        # a setting added to the code after the run was made counts as its default, so the run
        # still resumes unless the new setting is given another value
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        changed = {k: (old.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("device", "compile", "run_dir") and old.get(k, defaults[k]) != v}
        if changed:
            raise UserError(f"{cfg.run_dir} holds a run with other settings {changed} (old, new); "
                            "resume it with the same flags or choose another --run_dir")
    write_json(cfg_path, dataclasses.asdict(cfg))

"""What every trainer shares and no paper describes: flags, devices, run directories, the
optimiser and its schedule, metrics.

  - `parse_config`, `cli`     a config dataclass becomes the script's flags; a user's mistake is
                              one line (`error: ...`, exit 2), a bug keeps its traceback
  - `check_ranges`            refuse out-of-range flags, all at once, by name
  - `get_device`              cuda > mps > cpu, or the named one
  - `prepare_out_dir`         a run directory: refuse to mix two runs, check --resume
  - `configure_optimizer`, `lr_schedule`   AdamW (decay on matrices only), warm-up + linear decay
  - `check_finite`, `log_metrics`          stop at NaN/inf; one JSON line per step
(The trainers' resumable checkpoints are in checkpoint.py.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields

import torch

from data import UserError, read_json


# -----------------------------------------------------------------------------
# Flags



def parse_config(cls, description: str = "", defaults=None, argv=None):
    """Command-line flags that mirror a config dataclass: one --flag per field, typed by its
    default (bools as --flag / --no-flag). Every script uses this, so a flag is always spelled
    as the field it sets."""
    import argparse

    defaults = defaults or cls()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        v = getattr(defaults, f.name)
        if isinstance(v, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=v)
        else:
            p.add_argument(f"--{f.name}", type=type(v), default=v)
    return cls(**vars(p.parse_args(argv)))


def cli(main, cls, description: str = "", defaults=None):
    """Run a script: flags -> config -> main(config). A user's mistake (UserError: a bad flag,
    file or checkpoint) is printed as one line and exits with status 2; a bug keeps its
    traceback."""
    import sys

    try:
        return main(parse_config(cls, description, defaults))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_ranges(cfg, rules: dict):
    """rules: {flag: (ok, what it must be)}. Raises one UserError listing every flag that is
    out of range, so a user fixes them all at once."""
    bad = [f"--{name} {getattr(cfg, name)!r} (must be {what})" for name, (ok, what) in rules.items() if not ok]
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


def lr_schedule(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over warmup_steps, then linear decay from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr + (min_lr - lr) * min(1.0, frac)


# Flags that may change between a run and its --resume: they do not change what is computed.
RESUMABLE_CHANGES = {"resume", "overwrite", "device", "compile", "save_every", "eval_every", "show_example"}


def prepare_out_dir(cfg) -> str:
    """Check out_dir before anything is trained; returns the checkpoint directory out_dir/model.

    A fresh run refuses an out_dir that holds an earlier run (its metrics.jsonl would be
    appended to, its checkpoint replaced) unless --overwrite says so. --resume needs a
    checkpoint there and refuses settings that differ from the saved ones (other than the
    RESUMABLE_CHANGES, and max_steps, which extends a run)."""
    import dataclasses

    ckpt = os.path.join(cfg.out_dir, "model")
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    state = os.path.join(ckpt, "trainer_state.pt")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir {cfg.out_dir} is a file")
    if cfg.resume:
        if not os.path.exists(state):
            raise UserError(f"--resume: no checkpoint with trainer state in {ckpt}")
        saved = read_json(os.path.join(ckpt, "train_config.json"))
        now = dataclasses.asdict(cfg)
        changed = {k: (saved.get(k), v) for k, v in now.items()
                   if k not in RESUMABLE_CHANGES | {"max_steps"} and saved.get(k) != v}
        if changed:
            raise UserError(f"--resume: {ckpt} was trained with other settings {changed} (saved, now); "
                            "resume with the same flags, or start a new run in another --out_dir")
    elif os.path.exists(metrics) or os.path.exists(state):
        if not cfg.overwrite:
            raise UserError(f"--out_dir {cfg.out_dir} holds an earlier run; use --resume to continue it, "
                            "--overwrite to start afresh there, or another --out_dir")
        for f in (metrics, state):  # the old weights stay until the first save replaces them
            if os.path.exists(f):
                os.remove(f)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return ckpt


def log_metrics(out_dir: str, row: dict):
    """Append one row to out_dir/metrics.jsonl (strict JSON: NaN never gets here)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")

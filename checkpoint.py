"""Checkpoints: Hugging Face-layout model directories, and the trainers' resumable saves.

A model directory, as transformers writes it:
    config.json        LlamaForCausalLM (or Qwen2ForCausalLM when q/k/v carry a bias)
    model.safetensors  tensors under HF names ("model.layers.0.self_attn.q_proj.weight", ...),
                       or shards listed in model.safetensors.index.json
    tokenizer.json     (+ tokenizer_config.json with the chat template) when a tokenizer is given
so `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads what we save, and we load
Llama-family checkpoints that others saved (Llama, Qwen2, Mistral; tied or not, sharded or not).

  - `save_pretrained`, `from_pretrained`, `load_checkpoint`   the model directory
  - `save_dir`, `recover_dir`      a directory that appears all at once, for a trainer's
                                   out_dir/model (train_utils.OutDir saves through it)
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import torch

from data import UserError, load_tokenizer, read_json
from model import ModelConfig, Transformer, rope_tables


# -----------------------------------------------------------------------------
# The model directory


def _hf_name(name: str) -> str:
    # our module names are HF's, minus the "model." prefix on everything but the head
    return name if name.startswith("lm_head.") else "model." + name


def config_to_hf(cfg: ModelConfig) -> dict:
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config from an HF config.json dict; `where` names the file in error messages."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: unsupported architecture {arch!r}; tinyalign loads {sorted(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise UserError(f"{where}: missing key(s) {missing}; is this a Llama-family config.json?")
    # transformers < 5 writes rope_theta / rope_scaling at the top level, 5.x nests them in
    # rope_parameters; a scaled rotary (linear, llama3, yarn...) would load silently wrong
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{where}: rope scaling {rope_type!r} is not implemented (plain rotary only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{where}: Llama attention_bias/mlp_bias (bias on o_proj/MLP) is not implemented")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window and window < hf.get("max_position_embeddings", 0):
        raise UserError(f"{where}: sliding-window attention (window {window}) is not implemented")
    n_heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def save_pretrained(model: Transformer, path: str, tokenizer=None, extra_files: dict | None = None,
                    metadata: dict | None = None):
    """Write model.safetensors + config.json (+ tokenizer.json and its tokenizer_config.json,
    + extra files: name -> str or bytes) into the directory `path`. Like transformers, it
    touches no other file there.

    Every file is first written under a hidden temp name in the same directory, then renamed
    over its final name (atomic on one filesystem): a crash or Ctrl-C while writing leaves the
    previous version of every file intact. The weights are renamed last and carry `metadata`
    (str -> str; a trainer stores its step there, so that --resume can tell that the weights
    and the trainer state come from the same save)."""
    from safetensors.torch import save_file

    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: HF stores only the embedding
        tensors[_hf_name(name)] = t.detach().to("cpu", torch.float32).contiguous()

    def write_text(content):
        def write(p):
            with open(p, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        return write

    writers = {}  # final name -> function writing the file at a given path; renamed in this order
    if tokenizer is not None:
        writers["tokenizer.json"] = tokenizer.save
        for name, content in getattr(tokenizer, "config_files", dict)().items():
            writers[name] = write_text(content)  # tokenizer_config.json, chat template
    for name, content in (extra_files or {}).items():  # e.g. the trainer's config and state
        writers[name] = write_text(content)
    writers["config.json"] = write_text(json.dumps(config_to_hf(cfg), indent=2))
    writers["model.safetensors"] = lambda p: save_file(tensors, p, metadata={"format": "pt", **(metadata or {})})

    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    remove_stale_temps(path, writers)
    umask = os.umask(0)
    os.umask(umask)
    temps = []
    try:
        for name, write in writers.items():
            tmp = os.path.join(path, f".{name}.tmp-{os.getpid()}")
            temps.append(tmp)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files private (0600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # on disk before it replaces anything
        for tmp, name in zip(temps, writers):
            os.replace(tmp, os.path.join(path, name))
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        if created and not os.listdir(path):
            os.rmdir(path)  # a failed first save leaves nothing behind
        raise


def remove_stale_temps(path: str, names):
    """Delete the hidden temp files (.NAME.tmp-PID) that a killed save of these files left in
    path; a process that is still alive keeps its own."""
    import re

    for f in os.listdir(path):
        m = re.fullmatch(r"\.(.+)\.tmp-(\d+)", f)
        if m and m.group(1) in names and not _alive(int(m.group(2))):
            os.remove(os.path.join(path, f))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_safetensors(file: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt file
        raise UserError(f"{file}: cannot read the weights ({e}); the file is damaged or truncated") from None


def checkpoint_metadata(path: str) -> dict:
    """The metadata stored in a checkpoint's model.safetensors header (empty when sharded)."""
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        return {}
    try:
        with safe_open(file, "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise UserError(f"{file}: cannot read the weights ({e}); the file is damaged or truncated") from None


def load_state_dict_files(path: str) -> dict:
    """All tensors of a checkpoint directory: model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _read_safetensors(single)
    if os.path.exists(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(path, shard)))
        return tensors
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def check_checkpoint_dir(path: str):
    """A clear error for a path that is not a checkpoint directory at all."""
    if not path or not os.path.exists(path):
        raise UserError(f"{path or '(empty path)'}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file; a checkpoint is a directory holding config.json and model.safetensors")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{path}: no config.json; a checkpoint is a directory holding config.json and model.safetensors")


def from_pretrained(path: str, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """Load a tinyalign or HF Llama-family checkpoint directory. `overrides` replace config
    fields that do not change tensor shapes (dropout, max_seq_len, ...)."""
    check_checkpoint_dir(path)
    cfg_path = os.path.join(path, "config.json")
    cfg = config_from_hf(read_json(cfg_path), cfg_path)
    for k, v in overrides.items():
        if k not in {f.name for f in fields(ModelConfig)}:
            raise ValueError(f"unknown config field {k!r}")
        setattr(cfg, k, v)
    with torch.device("meta"):
        model = Transformer(cfg)  # shapes only; real tensors come from the files
    tensors = {k: v for k, v in load_state_dict_files(path).items() if "rotary_emb" not in k}
    expected = {_hf_name(n): p for n, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match config: missing tensors {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}")
    for name, p in expected.items():
        if tensors[name].shape != p.shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"config expects {tuple(p.shape)}")
    ours = {n: tensors[_hf_name(n)].to(dtype) for n in model.state_dict() if _hf_name(n) in tensors}
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # buffers were created on the meta device: rebuild the rotary tables for real
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device)


def checkpoint_kind(path: str) -> str:
    """What a checkpoint directory holds: "reward_model" (reward.py's output: the trunk plus
    score.safetensors and reward.json) or "language_model" (anything else: an SFT model, a
    policy, an HF chat model)."""
    marks = ("score.safetensors", "reward.json")
    return "reward_model" if any(os.path.exists(os.path.join(path, m)) for m in marks) else "language_model"


def load_checkpoint(path: str, device="cpu", kind: str = "language_model", **overrides):
    """(model, tokenizer) from one checkpoint directory, checked against each other: every
    token id the tokenizer can produce must have a row in the model's embedding. A directory of
    another kind (checkpoint_kind) than asked for is refused; kind=None takes either."""
    check_checkpoint_dir(path)
    if kind is not None and checkpoint_kind(path) != kind:
        raise UserError(f"{path} is a reward model (reward.py's output), not a language model: give an SFT or "
                        "policy checkpoint here" if kind == "language_model" else
                        f"{path} is not a reward model (no score.safetensors and reward.json): give reward.py's "
                        "out_dir/model here")
    model = from_pretrained(path, device, **overrides)
    tok = load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; they do not belong together")
    return model, tok


# -----------------------------------------------------------------------------
# A directory replaced as a whole (a trainer's out_dir/model)


def save_dir(final: str, write):
    """Write a directory so that it appears all at once: write(tmp) fills a new directory
    beside `final`, which is then switched in by renames, in this order:
        .NAME.tmp-PID   being written (a kill here: removed by the next run)
        .NAME.ready-PID complete; files of the old directory that the new one lacks (your
                        notes) are moved into it
        .NAME.old-PID   the old directory, moved aside; then ready becomes NAME, old is removed
    recover_dir finishes or undoes a switch a kill interrupted: at every moment either the old
    checkpoint or the new one is complete, never a mix of their files."""
    import shutil

    parent, name = os.path.split(os.path.abspath(final))
    tmp, ready, old = (os.path.join(parent, f".{name}.{kind}-{os.getpid()}") for kind in ("tmp", "ready", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        os.rename(tmp, ready)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _switch(ready, final, old)


def _switch(ready: str, final: str, old: str):
    """Move the files of `final` that `ready` lacks into it, then put `ready` in final's place."""
    import shutil

    if os.path.isdir(final):
        for f in os.listdir(final):
            if not os.path.exists(os.path.join(ready, f)):
                os.rename(os.path.join(final, f), os.path.join(ready, f))
        os.rename(final, old)
    os.rename(ready, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str):
    """Finish or undo a save_dir that a kill interrupted (see there); removes its leftovers."""
    import glob
    import shutil

    parent, name = os.path.split(os.path.abspath(final))
    for tmp in glob.glob(os.path.join(parent, f".{name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)  # never finished: the old directory still stands
    ready = sorted(glob.glob(os.path.join(parent, f".{name}.ready-*")), key=os.path.getmtime)
    if ready:  # a complete new checkpoint that was not switched in yet
        for r in ready[:-1]:
            shutil.rmtree(r, ignore_errors=True)
        _switch(ready[-1], final, os.path.join(parent, f".{name}.old-recovered"))
    for old in glob.glob(os.path.join(parent, f".{name}.old-*")):
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)

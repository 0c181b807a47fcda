"""Write the student copy of tinyalign: the repository with every exercise cut out.

    python scripts/make_student_copy.py OUT_DIR
    python scripts/make_student_copy.py OUT_DIR --exercises dpo_loss,gae   # cut only these

An exercise is the body of a function in the real code (its signature and docstring stay
outside), between two comment lines at the body's indentation: `# --- exercise: <name> ---`
and `# --- end exercise ---`.

The copy holds the repository's files (those git tracks or would track: `git ls-files
--cached --others --exclude-standard`, so runs/ and models/ stay out; outside a git checkout,
every file but those of NOT_SOURCE) with each marked region replaced by
`raise NotImplementedError("<what to implement, the equation, the grader>")`.
Signatures and docstrings stay, so the copy imports and every script starts (`python sft.py
--help`); a run fails when it first reaches an exercise. An exercise may span several
functions (masked_stats: masked_mean and masked_whiten); its grader is
tests/course/test_<name>.py and the handout is docs/course.md.

The copy has no git history (the history holds the solutions). It is written to a temporary
directory beside OUT_DIR and renamed at the end, so a failure leaves no half-written copy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Exercise:
    points: int
    where: str  # file: function(s)
    task: str  # what to implement, with its equation (the stub's message)


# In the order of the handout (docs/course.md), which follows the pipeline.
EXERCISES = {
    "rope": Exercise(5, "model.py: apply_rope",
                     "rotary embedding in the 'rotate half' layout: x·cos + rotate_half(x)·sin with "
                     "rotate_half(x) = cat(-x[..., hd/2:], x[..., :hd/2]); return x's dtype"),
    "attention": Exercise(10, "model.py: Attention.forward",
                          "q, k, v projections split into heads, RoPE on q and k, the KV cache (write k, v at "
                          "columns [start, start+T), attend over [0, start+T)), y = softmax(q kᵀ/√hd + mask) v "
                          "(mask None: causal when T > 1; key head h // (H/H_kv) serves query head h), then o_proj"),
    "top_p": Exercise(6, "sampling.py: filter_logits",
                      "top-k (keep the k largest logits and their ties), then top-p on what is left: drop a token "
                      "when the probability mass before it (sorted descending) already reaches top_p; "
                      "dropped logits = -inf"),
    "logprobs": Exercise(6, "model.py: token_logprobs, sequence_logprobs",
                         "token_logprobs = log_softmax(logits / T) gathered at the targets, in fp32; "
                         "sequence_logprobs: the logits at column t score input_ids[:, t+1] (the one-token shift), "
                         "times response_mask[:, 1:]"),
    "sft_loss": Exercise(6, "sft.py: lm_loss",
                         "mean cross-entropy of logits[:, t] against input_ids[:, t+1] over every target with "
                         "loss_mask[:, t+1] = 1 (the reply and its EOS), in fp32"),
    "bradley_terry": Exercise(6, "reward.py: comparison_loss",
                              "InstructGPT eq. 1: per prompt -mean over its pairs of log σ(r_w - r_l) "
                              "(F.logsigmoid), then the mean over prompts; and the share of pairs with r_w > r_l"),
    "dpo_loss": Exercise(10, "dpo.py: preference_loss",
                         "h = (π_w - ref_w) - (π_l - ref_l); dpo: -(1-ε) log σ(βh) - ε log σ(-βh); "
                         "ipo: (h - 1/(2β))²; nll = -π_w / |y_w|, + α·nll; rewards β(π - ref), detached"),
    "masked_stats": Exercise(4, "ppo.py: masked_mean, masked_whiten",
                             "masked_mean = Σ x·m / max(Σ m, 1); masked_whiten = (x - μ) / √(σ² + eps) · m with "
                             "μ and the biased σ² over the masked-in entries"),
    "entropy": Exercise(3, "ppo.py: token_entropy",
                        "H_t = -Σ_v p_v log p_v with p = softmax(logits / T), from log_softmax, in fp32"),
    "kl_reward": Exercise(5, "ppo.py: per_token_rewards",
                          "kl = (log π - log π_ref)·mask; r_t = -β·kl_t, plus the score on each row's last "
                          "response token (column mask.sum - 1); return (rewards, kl)"),
    "gae": Exercise(8, "ppo.py: gae",
                    "δ_t = r_t + γ V_(t+1) - V_t, A_t = δ_t + γλ A_(t+1), backwards; V and A are 0 after the last "
                    "response token; return (A, (A + V)·mask)"),
    "policy_loss": Exercise(8, "ppo.py: policy_loss",
                            "ρ = exp(log π - log π_old); loss = masked mean of max(-Aρ, -A·clip(ρ, 1-ε, 1+ε)); "
                            "stats clip_frac, approx_kl = mean(ρ - 1 - log ρ), ratio_dev = max |ρ - 1|"),
    "value_loss": Exercise(4, "ppo.py: value_loss",
                           "V_clip = V_old + clip(V - V_old, -c, c); loss = ½ masked mean of "
                           "max((V - R)², (V_clip - R)²); and the share of tokens with |V - V_old| > c"),
    "group_advantages": Exercise(6, "ppo.py: rloo_advantages, grpo_advantages",
                                 "RLOO: A_i = R_i - mean of the other k-1 rewards of its group; GRPO: "
                                 "(r_i - mean) / (std + eps), Bessel's std, or r_i - mean without normalize_std"),
    "parse_score": Exercise(7, "judge.py: parse_score",
                            "the number of the LAST 'score' statement as a float in [0, 5]; None when there is none, "
                            "or the last is unreadable, a range, not out of 5, or out of range"),
    "build_pairs": Exercise(6, "self_reward.py: build_pairs",
                            "(best, worst) by score, ignoring None; else 'too few scores', 'none finished' (the "
                            "best must have ended), 'tie' or 'identical' (same stripped text)"),
}

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# --- exercise: (?P<name>[A-Za-z0-9_]+) ---[ \t]*$")
END = re.compile(r"^[ \t]*# --- end exercise ---[ \t]*$")


def grader(name: str) -> str:
    return f"python -m pytest -q tests/course/test_{name}.py"


def regions(text: str, path: str) -> list[tuple[str, int, int, str]]:
    """(name, first line, last line, indent) of every marked region, 0-based, markers included.
    A marker out of place (unknown name, nested, unclosed) is an error naming file and line."""
    found, open_at = [], None
    for i, line in enumerate(text.splitlines()):
        begin = BEGIN.match(line)
        if begin:
            if open_at is not None:
                raise SystemExit(f"{path}:{i + 1}: exercise region opened inside the one opened at line {open_at[1] + 1}")
            if begin["name"] not in EXERCISES:
                raise SystemExit(f"{path}:{i + 1}: unknown exercise {begin['name']!r} (add it to EXERCISES in "
                                 f"scripts/make_student_copy.py)")
            open_at = (begin["name"], i, begin["indent"])
        elif END.match(line):
            if open_at is None:
                raise SystemExit(f"{path}:{i + 1}: '# --- end exercise ---' without an opening marker")
            found.append((open_at[0], open_at[1], i, open_at[2]))
            open_at = None
    if open_at is not None:
        raise SystemExit(f"{path}:{open_at[1] + 1}: exercise {open_at[0]!r} is never closed")
    return found


def stub(name: str, indent: str) -> list[str]:
    """`raise NotImplementedError("...")` at the body's indentation, the message wrapped."""
    ex = EXERCISES[name]
    message = (f"exercise {name} ({ex.points} points, {ex.where}): {ex.task}. "
               f"Grade it: {grader(name)} (handout: docs/course.md)")
    chunks = textwrap.wrap(message, 88, break_long_words=False, drop_whitespace=False)
    lines = [f"{indent}raise NotImplementedError("]
    lines += [f"{indent}    {chunk!r}" for chunk in chunks]
    lines[-1] += ")"
    return lines


def cut(text: str, path: str, names=None) -> tuple[str, list[str]]:
    """text with every region (of the exercises in `names`, default all) replaced by its stub,
    and the names of the regions cut. Regions not cut keep their solution and markers."""
    found = [r for r in regions(text, path) if names is None or r[0] in names]
    if not found:
        return text, []
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines[0].endswith("\r\n") else "\n"
    for name, first, last, indent in reversed(found):
        lines[first:last + 1] = [line + newline for line in stub(name, indent)]
    return "".join(lines), [name for name, *_ in found]


# outside a git checkout (a tarball, a student copy): what .gitignore leaves out
NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", "runs", "out", "models", ".whl"}


def repo_files(root: str) -> list[str]:
    """Relative paths of the files git tracks or would track (not the ignored ones); outside a
    git checkout, every file but those under NOT_SOURCE and *.pyc."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, check=True, capture_output=True).stdout
        return sorted({p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))})
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in NOT_SOURCE)
            files += [os.path.relpath(os.path.join(d, n), root) for n in names if not n.endswith(".pyc")]
        return sorted(files)


def make_student_copy(out_dir: str, root: str = ROOT, exercises=None, quiet: bool = False) -> dict[str, list[str]]:
    """Write the copy to out_dir (which must not exist or be empty), cutting the given exercises
    (default: all). Returns {exercise: [files it was cut from]}."""
    names = list(EXERCISES) if exercises is None else list(exercises)
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise SystemExit(f"unknown exercise(s) {', '.join(unknown)}; the exercises are: {', '.join(EXERCISES)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SystemExit(f"{out_dir}: exists and is not an empty directory; choose a new one or remove it")
    inside = os.path.relpath(out_dir, root)
    files = [p for p in repo_files(root) if inside.startswith("..") or not (p + "/").startswith(inside + "/")]
    cuts: dict[str, list[str]] = {}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".student_copy.", dir=parent)
    try:
        for rel in files:
            src, dst = os.path.join(root, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if rel.endswith(".py"):
                with open(src, encoding="utf-8", newline="") as f:
                    text, done = cut(f.read(), rel, names)
                for name in done:
                    cuts.setdefault(name, [])
                    if rel not in cuts[name]:
                        cuts[name].append(rel)
                with open(dst, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
                shutil.copymode(src, dst)
            else:
                shutil.copy2(src, dst)
        missing = [name for name in names if name not in cuts]
        if missing:
            raise SystemExit(f"no region marked for exercise(s) {', '.join(missing)} in {root}")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        total = sum(EXERCISES[n].points for n in names)
        print(f"student copy: {len(files)} files in {out_dir}, {len(cuts)} exercises ({total} points) cut:")
        for name, ex in EXERCISES.items():
            if name in names:
                print(f"  {name:17s} {ex.points:3d}  {ex.where:44s} {grader(name)}")
    return cuts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where to write the copy (must not exist, or be empty)")
    p.add_argument("--exercises", default="", help="comma-separated exercises to cut (default: all of them: "
                   + ", ".join(EXERCISES) + ")")
    args = p.parse_args(argv)
    make_student_copy(args.out_dir, exercises=[n for n in args.exercises.split(",") if n] or None)


if __name__ == "__main__":
    sys.exit(main())

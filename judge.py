"""The model as its own judge (LLM-as-a-Judge, Self-Rewarding LMs section 2.1).

  - `load_judge_template`, `fill`   the judge prompt (judge_prompt.txt in the task world,
                                    judge_prompt_real.txt for real text), {instruction} and
                                    {response} filled in
  - `parse_score`                   the judge's text -> its final score in [0, 5], or None
  - `score`                         sample the judge several times per item, average the
                                    parsable scores; an item with none has no score
  - `parse_verdict`, `compare_pairs`, `win_shares`, `score_pairwise`  a pairwise judge
                                    (judge_prompt_pairwise.txt, not the paper's): two
                                    responses in both orders, each response scored by the
                                    share of its comparisons it wins
A parse failure is never turned into a score: it is None, counted and reported.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from data import Tokenizer
from model import Transformer
from sampling import sample_responses


# -----------------------------------------------------------------------------
# The judge prompt


HERE = os.path.dirname(os.path.abspath(__file__))
WORLD_PROMPT = os.path.join(HERE, "judge_prompt.txt")  # the task world, the paper's pointwise judge
REFERENCE_PROMPT = os.path.join(HERE, "judge_prompt_reference.txt")  # the task world, reference-guided
REAL_PROMPT = os.path.join(HERE, "judge_prompt_real.txt")  # real text
PAIRWISE_PROMPT = os.path.join(HERE, "judge_prompt_pairwise.txt")  # the task world, two responses compared


def load_judge_template(path=None):
    """The LLM-as-a-Judge template (judge_prompt.txt beside this file unless path is given).
    A template with a {reference} slot is reference-guided: the judge is shown a reference
    answer (in the self-rewarding loop: the model's own) above the response."""
    if path is None:
        path = WORLD_PROMPT
    with open(path, encoding="utf-8") as f:
        template = f.read().strip()
    for slot in ("{instruction}",) + (("{response_a}", "{response_b}") if is_pairwise(template) else ("{response}",)):
        if slot not in template:
            raise ValueError(f"{path}: judge template has no {slot} placeholder")
    if is_pairwise(template) and ("{response}" in template or "{reference}" in template):
        raise ValueError(f"{path}: a pairwise judge template has {{response_a}} and {{response_b}}, "
                         "not {response} or {reference}")
    return template


def is_pairwise_file(path: str) -> bool:
    """Whether the judge template at `path` is pairwise (False for no path or no such file:
    loading it later reports that)."""
    return bool(path) and os.path.isfile(path) and is_pairwise(load_judge_template(path))


def fill(template, instruction, response, reference=None):
    """Fill the judge template. One regex pass, so braces in the instruction or response
    (even a literal "{response}" inside the instruction) are left exactly as written.
    A pairwise template takes `response` as the pair (response A, response B)."""
    if ("{reference}" in template) != (reference is not None):
        raise ValueError("a reference answer is needed exactly when the template has a {reference} slot")
    if is_pairwise(template) != isinstance(response, tuple):
        raise ValueError("a pairwise template takes a pair of responses (A, B), a pointwise one a single response")
    values = {"instruction": instruction, "response": response, "reference": reference}
    if is_pairwise(template):
        values.update(response_a=response[0], response_b=response[1])
    return re.sub(r"\{(instruction|response_a|response_b|response|reference)\}", lambda m: values[m.group(1)], template)


def is_reference_guided(template: str) -> bool:
    return "{reference}" in template


def is_pairwise(template: str) -> bool:
    """A template that shows two responses and asks which is better (judge_prompt_pairwise.txt)."""
    return "{response_a}" in template


# -----------------------------------------------------------------------------
# Reading and sampling the verdict


# A score statement is the word "score" (a stated range like "(0-5)" may follow) and then,
# after a few separator characters, the number: "Score: 4", "score - 4.0", "**Score:** 4/5",
# "SCORE: 3 points", "the score is 3". The judge is asked to END with "Score: <points>", so the LAST statement
# is the verdict, and if that one is unreadable ("Score: none", "Score: 3-5", "Score: 4/10",
# "Score: 7") the answer is None: an earlier statement the judge went on to revise is not
# its verdict. "score" in prose ("that explains the score.") is no statement and is skipped.
# The sign and a leading "." belong to the number ("Score: -1" is out of range, not 1).
SCORE_WORD_RE = re.compile(r"\bscore(?:\s*[(\[]\s*\d\s*[-–]\s*\d\s*[)\]])?", re.IGNORECASE)
SCORE_VALUE_RE = re.compile(r"[\s:*_=\-–]{0,6}?(?:is\s+)?(-?(?:\d+(?:\.\d+)?|\.\d+))(\s*[-–]\s*\d)?(?:\s*/\s*(\d+))?")
SCORE_COLON_RE = re.compile(r"[\s*_]*[:=]")  # "Score:" followed by no number: an unreadable statement


def parse_score(text: str | None) -> float | None:
    """The judge's final score in [0, 5], or None when there is none. A failure never
    becomes a score."""
    # --- exercise: parse_score ---
    if not text:
        return None
    verdict = None  # (number, range tail, denominator) of the last statement; "" if unreadable
    for word in SCORE_WORD_RE.finditer(text):
        rest = text[word.end():]
        value = SCORE_VALUE_RE.match(rest)
        if value:
            verdict = value.groups()
        elif SCORE_COLON_RE.match(rest):
            verdict = ""
    if not verdict:
        return None
    number, range_tail, out_of = verdict
    if range_tail or (out_of and out_of != "5"):
        return None  # "3-5" is no single score; "4/10" is not on our scale
    value = float(number)
    return value if 0.0 <= value <= 5.0 else None
    # --- end exercise ---


@dataclass
class Judgment:
    score: float | None  # mean of the parsable samples; None if none parsed
    samples: list[float | None]  # each sample's parsed score
    texts: list[str | None]  # what the judge wrote


def score(model: Transformer, tok: Tokenizer, template: str, items: list[tuple[str, str]],
          n_samples: int = 3, temperature: float = 0.7, top_p: float = 0.9,
          max_new_tokens: int = 64, batch_size: int = 64, generator=None,
          desc: str = "judging", top_k: int = 0, references: list[str] | None = None,
          answer_max_new_tokens: int = 48) -> list[Judgment]:
    """Score (instruction, response) pairs with the model as its own judge: the judge prompt
    is sampled n_samples times and the parsable scores are averaged (Self-Rewarding LMs, 3
    samples). max_new_tokens is the judge's own budget, separate from the prompt length.
    A reference-guided template needs one reference answer per item: `references`, or else
    the model's own (reference_answers: it answers each question first, greedily).
    Identical items are judged once (their judgments are the same random function)."""
    if is_reference_guided(template) and references is None:
        references = reference_answers(model, tok, [ins for ins, _ in items], answer_max_new_tokens, batch_size)
    refs = references if references is not None else [None] * len(items)
    keys = list(dict.fromkeys(zip(items, refs)))  # distinct (item, reference), first-seen order
    prompts = [fill(template, ins, resp, ref) for (ins, resp), ref in keys]
    texts = sample_responses(model, tok, prompts, n_samples, temperature, top_p, max_new_tokens,
                             batch_size, generator, desc, top_k=top_k)
    judged = {}
    for key, t in zip(keys, texts):
        samples = [parse_score(x) for x in t]
        valid = [s for s in samples if s is not None]
        judged[key] = Judgment(sum(valid) / len(valid) if valid else None, samples, t)
    return [judged[key] for key in zip(items, refs)]


def reference_answers(model: Transformer, tok: Tokenizer, instructions: list[str], max_new_tokens: int = 48,
                      batch_size: int = 64) -> list[str]:
    """The model's own greedy answer to each instruction: the reference of reference-guided
    judging (MT-Bench, Zheng et al. 2023: the judge solves the question first, then grades
    the response against its own solution). Each distinct instruction is answered once."""
    distinct = list(dict.fromkeys(instructions))
    answers = sample_responses(model, tok, distinct, 1, 0.0, 1.0, max_new_tokens, batch_size, None, "reference answers")
    by_instruction = {q: a[0] if a[0] is not None else "" for q, a in zip(distinct, answers)}
    return [by_instruction[q] for q in instructions]


# A pairwise verdict: "Better: A", "Better: B" or "Better: same", the LAST such statement
# counting (as with the score); anything else there ("Better: both", "Better:") is unreadable.
VERDICT_RE = re.compile(r"\bbetter[ \t]*:[ \t]*([^\s.,;]*)", re.IGNORECASE)  # the verdict on the same line
VERDICT_POINTS = {"a": 1.0, "b": 0.0, "same": 0.5}  # what response A earns from one verdict


def parse_verdict(text: str | None) -> float | None:
    """Response A's share of one pairwise verdict: 1 (A better), 0 (B better), 0.5 (same),
    or None when the judge gave no readable verdict. A failure never becomes a verdict."""
    found = VERDICT_RE.findall(text or "")
    return VERDICT_POINTS.get(found[-1].lower()) if found else None


@dataclass
class Comparison:
    """One ordered comparison of a pairwise judge: response a shown as A, b as B."""
    a: str
    b: str
    verdicts: list[float | None]  # A's share of each verdict (parse_verdict): 1, 0.5, 0, or None
    texts: list[str | None]  # what the judge wrote, one per verdict


def compare_pairs(model: Transformer, tok: Tokenizer, template: str, groups: list[tuple[str, list[str]]],
                  n_samples: int = 3, temperature: float = 0.7, top_p: float = 0.9,
                  max_new_tokens: int = 64, batch_size: int = 64, generator=None,
                  desc: str = "pairwise judging", top_k: int = 0) -> list[list[Comparison]]:
    """Pairwise judging, the sampling (not the paper's: its judge scores one response at a
    time). For each (instruction, responses) group, every two distinct responses (exact text)
    are shown in both orders, (a, b) and (b, a), n_samples verdicts each. Cost: d (d - 1)
    n_samples judge prompts for d distinct responses (N = 8 candidates with 4 distinct answers
    and 3 samples: 36, against 12 for the pointwise judge's 4 distinct texts)."""
    keys, owners = [], []  # the judge prompts to sample; (group, a, b) for each
    for g, (instruction, responses) in enumerate(groups):
        distinct = list(dict.fromkeys(responses))
        for a in distinct:
            for b in distinct:
                if a != b:
                    keys.append(fill(template, instruction, (a, b)))
                    owners.append((g, a, b))
    texts = sample_responses(model, tok, keys, n_samples, temperature, top_p, max_new_tokens, batch_size,
                             generator, desc, top_k=top_k)
    out = [[] for _ in groups]
    for (g, a, b), t in zip(owners, texts):
        out[g].append(Comparison(a, b, [parse_verdict(x) for x in t], list(t)))
    return out


def win_shares(responses: list[str], comparisons: list[Comparison]) -> list[Judgment]:
    """Each response's score from the comparisons of its group: its average win rate,
        score(y_i) = mean over its readable verdicts v of v's points for y_i
    (1 a win, 0.5 "same", 0 a loss; as B it earns 1 - A's share). Because every pair is asked
    in both orders, a judge that always prefers the first position (or the second) gives
    every response the same share: the position bias cancels, and orders that disagree
    amount to "same". None if none of its verdicts was readable. A group with one distinct
    response has nothing to compare: each gets 0.5 from no verdict (a tie, as a pointwise
    judge would score identical texts alike). Identical texts share one score."""
    if len(set(responses)) == 1:
        return [Judgment(0.5, [], []) for _ in responses]
    got = {}  # response -> ([its points per verdict], [the judge's texts])
    for c in comparisons:
        for r, points in ((c.a, c.verdicts), (c.b, [None if v is None else 1.0 - v for v in c.verdicts])):
            ps, ts = got.setdefault(r, ([], []))
            ps.extend(points)
            ts.extend(c.texts)
    row = []
    for r in responses:
        ps, ts = got[r]
        valid = [p for p in ps if p is not None]
        row.append(Judgment(sum(valid) / len(valid) if valid else None, ps, ts))
    return row


def score_pairwise(model: Transformer, tok: Tokenizer, template: str, groups: list[tuple[str, list[str]]],
                   n_samples: int = 3, temperature: float = 0.7, top_p: float = 0.9,
                   max_new_tokens: int = 64, batch_size: int = 64, generator=None,
                   desc: str = "pairwise judging", top_k: int = 0) -> list[list[Judgment]]:
    """compare_pairs, then win_shares: one row of Judgments per group."""
    comparisons = compare_pairs(model, tok, template, groups, n_samples, temperature, top_p, max_new_tokens,
                                batch_size, generator, desc, top_k)
    return [win_shares(responses, c) for (_, responses), c in zip(groups, comparisons)]


def parse_failure_rate(judgments: list[Judgment]) -> float:
    samples = [s for j in judgments for s in j.samples]
    return sum(s is None for s in samples) / max(1, len(samples))

"""
tasks.py -- the synthetic task world of tinyalign.

The default run can download neither models nor data, and a tiny model trained from scratch
on real text could not judge anything. So tinyalign lives in a small world where every
response can be graded exactly by code. The oracle grader here plays the part of the human
labellers of InstructGPT and of the GPT-4 evaluator of Self-Rewarding Language Models.

What lives in this file, top to bottom:
  1. the lexicon and the task families (prompts in several phrasings, gold responses)
  2. sampling, the train / held-out split, and parse_task (prompt string -> Task)
  3. the oracle grader: an additive 5-point rubric, one short reason line per criterion
  4. corruptions: responses of a given quality (the mistakes alignment has to remove)
  5. the data sets: pretraining corpus, IFT seed, EFT seed, evaluation prompts and EFT eval
  6. the judge's target output (what a judge should write; the prompt itself is judge.py's)

Tasks work on lists of small numbers (0-99) and on short lists of words from a fixed
30-word lexicon. That suits a byte-level BPE with a small vocabulary that splits digits:
every lexicon word can be a single token, and nothing asks for letter-level manipulation.

Only the standard library is used, and every random choice goes through a random.Random
instance created from the caller's seed, so all data is reproducible.
"""

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction

# -----------------------------------------------------------------------------
# 1. The lexicon and the task families

# Short, common nouns and colours. None of them appears in a prompt template, a gold
# prefix ("Sorted:", "First 2:") or a filler phrase, so a word in a response that belongs to
# the lexicon is always an answer item.
LEXICON = [
    "apple", "cat", "dog", "red", "blue", "green", "sun", "moon", "star", "tree",
    "fish", "bird", "cake", "milk", "car", "box", "hat", "cup", "pen", "egg",
    "bed", "map", "key", "bag", "ball", "book", "rain", "cow", "pig", "bus",
]
_LEXICON_SET = set(LEXICON)

CRITERIA = ["relevant", "substantial", "basic elements", "correct", "impeccable"]


@dataclass(frozen=True)
class Family:
    """How one task family looks: its answer kind, prompt templates and gold sentence."""
    kind: str         # "num_list" (list of numbers), "word_list" (list of words), "number"
    templates: tuple  # prompt phrasings; slots {xs} {ws} {a} {b} {w} {k}
    gold: str         # gold sentence; slots {ans} (the answer) and {k}
    far: int = 0      # number families: |error| <= far earns "substantial"
    near: int = 0     # number families: |error| <= near earns "basic elements"


SPECS = {
    "sort_asc": Family("num_list", (
        "Sort these numbers in ascending order: {xs}",
        "Could you sort these for me from smallest to largest: {xs}?",
        "Put {xs} in increasing order.",
        "Please arrange from low to high: {xs}",
    ), "Sorted: {ans}."),
    "sort_desc": Family("num_list", (
        "Sort these numbers in descending order: {xs}",
        "Could you sort these for me from largest to smallest: {xs}?",
        "Put {xs} in decreasing order.",
        "Please arrange from high to low: {xs}",
    ), "Sorted: {ans}."),
    "reverse": Family("num_list", (
        "Reverse this list: {xs}",
        "Can you write {xs} backwards?",
        "Give me these numbers in reverse order: {xs}",
        "What is {xs} reversed?",
    ), "Reversed: {ans}."),
    "add": Family("number", (
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Could you tell me the sum of {a} and {b}?",
        "Compute {a} + {b}.",
    ), "The sum is {ans}.", far=10, near=1),
    "sub": Family("number", (
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "Could you tell me the difference between {a} and {b}?",
        "Compute {a} - {b}.",
    ), "The difference is {ans}.", far=10, near=1),
    "max": Family("number", (
        "What is the largest number in {xs}?",
        "Find the maximum of these numbers: {xs}",
        "Which is biggest: {xs}?",
    ), "The largest is {ans}.", far=10, near=1),
    "min": Family("number", (
        "What is the smallest number in {xs}?",
        "Find the minimum of these numbers: {xs}",
        "Which is smallest: {xs}?",
    ), "The smallest is {ans}.", far=10, near=1),
    # Counts and lengths are small (0-7), so "the right range" is tighter for them.
    "count": Family("number", (
        "How many times does {w} appear in: {ws}?",
        "Count the word {w} in this list: {ws}",
        "Could you count how many times {w} shows up in {ws}?",
    ), "The count is {ans}.", far=2, near=1),
    "length": Family("number", (
        "How many items are in this list: {ws}?",
        "Count the items: {ws}",
        "How long is the list {ws}?",
        "Could you tell me how many words are in: {ws}?",
    ), "The list has {ans} items.", far=2, near=1),
    "repeat": Family("word_list", (
        "Repeat the word {w} {k} times.",
        "Say {w} {k} times.",
        "Could you write {w} {k} times for me?",
        "Write the word {w} exactly {k} times.",
    ), "Repeated: {ans}."),
    "first_k": Family("word_list", (
        "Give the first {k} items of: {ws}",
        "What are the first {k} words in {ws}?",
        "Could you list the first {k} of these: {ws}?",
    ), "First {k}: {ans}."),
    "last_k": Family("word_list", (
        "Give the last {k} items of: {ws}",
        "What are the last {k} words in {ws}?",
        "Could you list the last {k} of these: {ws}?",
    ), "Last {k}: {ans}."),
}
FAMILIES = list(SPECS)


@dataclass(frozen=True)
class Task:
    """One instance of a task family: the prompt, its structured inputs, answer and gold."""
    family: str
    prompt: str
    args: tuple
    answer: object  # tuple for list families, int for number families
    gold: str


@dataclass
class Grade:
    """The oracle's verdict: 0..5 points and exactly one reason line per criterion."""
    points: int
    reasons: list


def _solve(family, args):
    """The canonical answer of a family for the given args."""
    if family == "sort_asc":
        return tuple(sorted(args[0]))
    if family == "sort_desc":
        return tuple(sorted(args[0], reverse=True))
    if family == "reverse":
        return tuple(reversed(args[0]))
    if family == "add":
        return args[0] + args[1]
    if family == "sub":
        return args[0] - args[1]
    if family == "max":
        return max(args[0])
    if family == "min":
        return min(args[0])
    if family == "count":
        return args[1].count(args[0])
    if family == "length":
        return len(args[0])
    if family == "repeat":
        return (args[0],) * args[1]
    if family == "first_k":
        return tuple(args[1][:args[0]])
    if family == "last_k":
        return tuple(args[1][-args[0]:])
    raise ValueError(f"unknown task family {family!r}")


def _slots(family, args):
    """Map a family's args onto the named template slots."""
    if family in ("sort_asc", "sort_desc", "reverse", "max", "min"):
        return {"xs": args[0]}
    if family in ("add", "sub"):
        return {"a": args[0], "b": args[1]}
    if family == "count":
        return {"w": args[0], "ws": args[1]}
    if family == "length":
        return {"ws": args[0]}
    if family == "repeat":
        return {"w": args[0], "k": args[1]}
    return {"k": args[0], "ws": args[1]}  # first_k, last_k


def _join(items, sep=" "):
    return sep.join(str(x) for x in items)


def render(family, args, answer):
    """Write an answer (right or wrong) in the family's gold sentence form."""
    ans = _join(answer) if isinstance(answer, (tuple, list)) else str(answer)
    return SPECS[family].gold.format(ans=ans, k=_slots(family, args).get("k", ""))


def make_task(family, args, phrasing=0, comma=False):
    """Build the Task for given args with prompt template number `phrasing`.
    comma=True writes lists in the prompt as "4, 1, 7" instead of "4 1 7"."""
    sep = ", " if comma else " "
    slots = {name: (_join(v, sep) if isinstance(v, tuple) else v)
             for name, v in _slots(family, args).items()}
    prompt = SPECS[family].templates[phrasing].format(**slots)
    answer = _solve(family, args)
    return Task(family, prompt, args, answer, render(family, args, answer))


# -----------------------------------------------------------------------------
# 2. Sampling, the held-out split, parsing prompts back into tasks

HELDOUT_PER_MILLE = 100  # 10% of all tasks are reserved for evaluation


def canonical_args(family, args):
    """The args with every order that cannot change the answer sorted away.

    "Add 3 and 5" and "add 5 and 3" are one task: same answer, and a model that has trained
    on one has seen the other. So add takes its two numbers as an unordered pair, sorting,
    max, min and length take their list as a multiset, and count its list as a multiset.
    In reverse, sub, first_k, last_k and repeat the order is part of the question."""
    if family == "add":
        return tuple(sorted(args))
    if family in ("sort_asc", "sort_desc", "max", "min", "length"):
        return (tuple(sorted(args[0])),)
    if family == "count":
        return (args[0], tuple(sorted(args[1])))
    return args


def task_key(task):
    """A task's identity: (family, canonical args). Tasks with the same key have the same
    answer; they differ only in phrasing or in an order the answer ignores. Use it to dedup
    tasks and to tell whether a new prompt is a held-out task or one seen before."""
    return (task.family, canonical_args(task.family, task.args))


def is_heldout(task):
    """True if the task belongs to the held-out evaluation split.

    The split is a stable hash of the task's identity (task_key), not of the prompt text:
    neither rephrasing a held-out task nor swapping "3 and 5" smuggles it into training.
    hashlib, because Python's hash() is salted per process."""
    family, args = task_key(task)
    key = f"{family}|{args!r}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 1000 < HELDOUT_PER_MILLE


# How hard the world is: list lengths, number ranges, repeat counts (self_reward.py
# --world_difficulty). "default" is the world every number in RESULTS.md was measured in;
# "easy" makes the model right far more often, so its samples include right answers to prefer.
DIFFICULTY = {
    "default": dict(list_len=(3, 7), max_num=99, repeat_k=(2, 5), words=(4, 7)),
    "easy": dict(list_len=(2, 4), max_num=19, repeat_k=(2, 3), words=(3, 4)),
}
_size = dict(DIFFICULTY["default"])


def set_difficulty(name: str):
    """Make every task drawn from now on (corpus, IFT, EFT, prompts, evaluation) this hard."""
    if name not in DIFFICULTY:
        raise ValueError(f"unknown world difficulty {name!r}; expected one of {list(DIFFICULTY)}")
    _size.clear()
    _size.update(DIFFICULTY[name])


def _sample_args(rng, family):
    """Random args for a family, inside the sizes a small model can handle (set_difficulty)."""
    lo, hi = _size["list_len"]
    top = _size["max_num"]
    if family in ("sort_asc", "sort_desc", "reverse", "max", "min"):
        while True:
            xs = tuple(rng.randint(0, top) for _ in range(rng.randint(lo, hi)))
            # a list that is already in the asked order makes the task trivial, and would
            # make "echo the input" a correct answer
            if family in ("max", "min") or _solve(family, (xs,)) != xs:
                return (xs,)
    if family == "add":
        return (rng.randint(0, top), rng.randint(0, top))
    if family == "sub":
        a, b = rng.randint(0, top), rng.randint(0, top)
        return (max(a, b), min(a, b))  # keep differences non-negative
    if family == "count":
        # draw the list from a pool of three words so the target shows up 0..n times
        pool = rng.sample(LEXICON, 3)
        return (pool[0], tuple(rng.choice(pool) for _ in range(rng.randint(lo, hi))))
    if family == "length":
        return (tuple(rng.choice(LEXICON) for _ in range(rng.randint(lo, hi))),)
    if family == "repeat":
        return (rng.choice(LEXICON), rng.randint(*_size["repeat_k"]))
    if family in ("first_k", "last_k"):
        ws = tuple(rng.sample(LEXICON, rng.randint(*_size["words"])))  # distinct, so order is checkable
        return (rng.randint(2, min(4, len(ws) - 1)), ws)
    raise ValueError(f"unknown task family {family!r}")


def sample_task(rng, family=None, split=None):
    """A random task (family uniform unless given, phrasing uniform).
    split: None for any task, "train" for non-held-out only, "heldout" for held-out only."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    while True:  # rejection sampling; every family has tasks on both sides of the split
        fam = family if family is not None else rng.choice(FAMILIES)
        args = _sample_args(rng, fam)
        task = make_task(fam, args, rng.randrange(len(SPECS[fam].templates)), rng.random() < 0.3)
        if split is None or is_heldout(task) == (split == "heldout"):
            return task


# Prompt parsing: each template becomes a regex with one group per slot. Prompts are
# compared after collapsing whitespace and dropping trailing . ? !, and case-insensitively,
# so a model that writes "put 3, 1 and 2 in increasing order" is still understood.
_NUM = r"[0-9]{1,3}"
_NUM_LIST = rf"{_NUM}(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+|\s+){_NUM})+"
_WORD = r"[A-Za-z]+"
_WORD_LIST = rf"{_WORD}(?:(?:\s*,\s*|\s+){_WORD})+"  # no "and": it would be ambiguous
_SLOT_RE = {"xs": _NUM_LIST, "ws": _WORD_LIST, "a": _NUM, "b": _NUM, "k": _NUM, "w": _WORD}


def _template_regex(template):
    parts = re.split(r"\{(\w+)\}", template.rstrip(".?!"))
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>{_SLOT_RE[part]})" if i % 2 else re.escape(part))
    return re.compile("".join(out), re.IGNORECASE)


_PARSERS = [(fam, _template_regex(t)) for fam, spec in SPECS.items() for t in spec.templates]


def _args_from_slots(family, g):
    """Turn matched slot strings into the family's args tuple."""
    nums = lambda s: tuple(int(x) for x in re.findall(r"[0-9]+", s))
    words = lambda s: tuple(w.lower() for w in re.findall(r"[A-Za-z]+", s))
    if family in ("sort_asc", "sort_desc", "reverse", "max", "min"):
        return (nums(g["xs"]),)
    if family in ("add", "sub"):
        return (int(g["a"]), int(g["b"]))
    if family == "count":
        return (g["w"].lower(), words(g["ws"]))
    if family == "length":
        return (words(g["ws"]),)
    if family == "repeat":
        return (g["w"].lower(), int(g["k"]))
    return (int(g["k"]), words(g["ws"]))


def _valid_args(family, args):
    """Looser than the sampler (a model may write 2 or 9 items) but still a sane task."""
    lists = [a for a in args if isinstance(a, tuple)]
    if any(not 2 <= len(xs) <= 10 for xs in lists):
        return False
    words = [a for a in args if isinstance(a, str)] + [w for xs in lists for w in xs
                                                       if isinstance(w, str)]
    if any(w not in _LEXICON_SET for w in words):
        return False
    if family == "repeat":
        return 2 <= args[1] <= 9
    if family in ("first_k", "last_k"):
        return 2 <= args[0] <= len(args[1])
    return True


def parse_task(prompt):
    """Recover the Task from a prompt in any of the known phrasings, or None.

    Used to oracle-grade prompts that a model wrote itself; the returned Task keeps the
    prompt string exactly as given."""
    if not isinstance(prompt, str) or len(prompt) > 400:
        return None
    norm = " ".join(prompt.split()).rstrip(" .?!")
    for family, regex in _PARSERS:
        m = regex.fullmatch(norm)
        if m:
            args = _args_from_slots(family, m.groupdict())
            if _valid_args(family, args):
                answer = _solve(family, args)
                return Task(family, prompt, args, answer, render(family, args, answer))
    return None


# -----------------------------------------------------------------------------
# 3. The oracle grader
#
# Answer extraction: find the answer the way a careful human grader would -- read the
# response's answer STATEMENT, ignore the parts that only repeat the question, and give no
# credit to a response that offers several answers.
#
# Tokens are numbers, words and single punctuation marks. A number may have a sign and a
# decimal part: "12.0" is the number 12, "12.5" is a number but never a whole answer.
# A hyphen right after a digit is not a minus sign, so "1-3-5" reads as 1, 3, 5.
# A "run" is a maximal sequence of answer items -- numbers for number families, lexicon
# words for word families -- joined only by spaces or separators: "," ";" "and" "-".
# Anything else (a full stop, "or", a non-lexicon word, a colon) ends the run.
# A run is STATED when it comes right after an answer cue: ":" "=" "is" "are" "has"
# "equals" (every family's own answer phrase ends in one: "The sum is", "Sorted:", "First 2:",
# "The list has"; an opening bracket or quote may stand in between) -- except in a question:
# a sentence that ends with "?" states nothing ("What is 70 minus 0?" does not answer 70).
# A run is OFFERED when "or", "/", "maybe", "perhaps", "possibly" or "either" stands between
# it and a neighbouring run: "12 or 13", "Sorted: 2 5 9. Maybe 5 2 9." put both forward.
# A run QUOTES the question when it is the task's input list exactly as given, or one or both
# numbers of add / sub, and is neither stated nor offered: it is the question mentioned, as in
# "The largest is 97 in 5 97 12." or "The sum is 12. (5 + 7)". A statement is always taken
# at its word, even when it repeats the input.
#
# Only runs that can be answers take part: for list families runs of >= 2 items, for number
# families every run (a run of several numbers then fails "relevant"). Then:
#   1. drop the runs that quote the question, unless nothing else is left;
#   2. the answer is the LAST stated run -- a later statement corrects an earlier one
#      ("Sorted: 9 5 2. No wait: 2 5 9.") -- or, with no statement at all, the last run;
#   3. the response offers several answers if another (non-quoting) run with other items comes
#      after the answer, or, with no statement, anywhere: "The sum is 12 or 13.", "13 or 12".
#      Offering several answers is not answering: it fails "relevant", as "12 30" does.
# In "The sum of 5 and 7 is 12." the answer is 12: "5 and 7" only quotes the question.
#
# Rubric (additive, strictly cumulative: a point is given only if all earlier points were,
# so 0..5 are ordered quality levels and the judge's job is "find the first failure"):
#   1 relevant        one answer of the right kind (a list of >= 2 items / one number)
#   2 substantial     right shape: right number of items / within `far` of the answer
#   3 basic elements  right content: same items as expected (any order) / within `near`
#   4 correct         the exact answer
#   5 impeccable      the whole response is the gold sentence (whitespace aside): correct,
#                     stated once, nothing extra, ends with a full stop
# Extra text around a correct answer therefore costs only the fifth point.

_TOKEN_RE = re.compile(r"(?P<num>(?<![0-9])-?[0-9]+(?:\.[0-9]+)?)|(?P<word>[A-Za-z]+)|\S")
_SEPARATORS = {",", ";", "and", "-"}
_CUES = {":", "=", "is", "are", "has", "equals"}
_BRACKETS = {"(", "[", '"', "'"}  # may stand between a cue and its run: "Sorted: [2, 5, 9]"
_HEDGES = {"or", "/", "maybe", "perhaps", "possibly", "either"}


@dataclass
class Run:
    """A run of answer items (see the extraction rule above)."""
    items: tuple
    stated: bool   # right after an answer cue, outside a question
    offered: bool  # next to "or", "maybe"...: put forward as an answer, never a quote


def _item(match, kind):
    """The answer item a token stands for, or None."""
    if kind == "word_list":
        word = (match.group("word") or "").lower()
        return word if word in _LEXICON_SET else None
    num = match.group("num")
    if num is None or len(num) > 24:  # a 5000-digit blob is no number
        return None
    if "." not in num:
        return int(num)
    value = Fraction(num)  # exact, so "12.000000000000000001" is not 12
    return int(value) if value.denominator == 1 else value


def _runs(text, kind):
    """All runs of answer items in the text, in order (see the extraction rule above)."""
    runs, items = [], []  # items: the run being read
    stated = offered = hedge = False  # hedge: "or", "maybe"... seen since the last run
    before, sentence = None, 0  # the last token outside a run; where this sentence's runs start
    for m in _TOKEN_RE.finditer(text):
        tok = m.group().lower()
        item = _item(m, kind)
        if item is not None:
            if not items:
                stated, offered = before in _CUES, hedge
                if hedge and runs:
                    runs[-1].offered = True  # "X or Y" offers both
            items.append(item)
            continue
        if items and tok in _SEPARATORS:
            continue  # separators keep the run open
        if items:
            runs.append(Run(tuple(items), stated, offered))
            items, hedge = [], False
        hedge = hedge or tok in _HEDGES
        if tok == "?":  # a question states nothing: "What is 70 minus 0?" does not answer 70
            for r in runs[sentence:]:
                r.stated = False
        if tok in (".", "!", "?"):
            sentence = len(runs)
        if tok not in _BRACKETS:
            before = tok
    if items:
        runs.append(Run(tuple(items), stated, offered))
    return runs


def _given_runs(task):
    """The runs that repeat the question's input: its list, or add / sub's numbers."""
    if task.family in ("add", "sub"):
        a, b = task.args
        return {(a,), (b,), (a, b), (b, a)}
    return {arg for arg in task.args if isinstance(arg, tuple)}


def _find_answer(task, runs):
    """(the answer run's items or None, True if the response offers several answers)."""
    if SPECS[task.family].kind != "number":
        runs = [r for r in runs if len(r.items) >= 2]  # only a list can answer a list task
    if not runs:
        return None, False
    given = _given_runs(task)
    own = [r for r in runs if r.stated or r.offered or r.items not in given]
    if not own:  # nothing but the question mentioned: grade what was mentioned last
        return runs[-1].items, False
    stated = [i for i, r in enumerate(own) if r.stated]
    i = stated[-1] if stated else len(own) - 1
    rivals = own[i + 1:] if stated else own[:i]
    return own[i].items, any(r.items != own[i].items for r in rivals)


def _list_checks(task, got, several, runs, norm):
    """Yield (ok, reason) for each criterion of a list family, stopping at the first miss."""
    noun = "words" if SPECS[task.family].kind == "word_list" else "numbers"
    if got is None:
        yield False, f"no list of {noun}"
        return
    if several:
        yield False, "several lists, not one"
        return
    yield True, f"gives a list of {noun}"
    ans = task.answer
    if len(got) != len(ans):
        yield False, "wrong number of items"
        return
    yield True, "right number of items"
    if task.family == "repeat":
        # every item is the same word, so "same items in any order" would equal "exact";
        # here the content point means: at most one word is wrong
        ok = sum(x == ans[0] for x in got) >= len(ans) - 1
        yield ok, "mostly the right word" if ok else "wrong words"
    elif task.family in ("first_k", "last_k"):
        ok = sorted(got) == sorted(ans)
        yield ok, "the right words" if ok else "wrong words"
    else:
        ok = sorted(got) == sorted(ans)
        yield ok, "same numbers as given" if ok else "numbers differ from given"
    if not ok:
        return
    if got != ans:
        yield False, "one word is wrong" if task.family == "repeat" else "wrong order"
        return
    yield True, "exact answer"
    yield _impeccable(task, runs, got, norm)


def _number_checks(task, got, several, runs, norm):
    """Yield (ok, reason) for each criterion of a number family, stopping at the first miss."""
    if got is None:
        yield False, "no number given"
        return
    if len(got) != 1 or several:
        yield False, "several numbers, not one"
        return
    yield True, "gives one number"
    spec, err = SPECS[task.family], abs(got[0] - task.answer)
    if err > spec.far:
        yield False, "far from the answer"
        return
    yield True, "in the right range"
    if err > spec.near:
        yield False, "off by more than one"
        return
    yield True, "off by at most one"
    if err:
        yield False, "off by one" if err == 1 else "not a whole number"
        return
    yield True, "exact answer"
    yield _impeccable(task, runs, got, norm)


def _impeccable(task, runs, got, norm):
    """The fifth point: the response (whitespace collapsed) is exactly the gold sentence."""
    if norm == task.gold:
        return True, "clean, stated once"
    if sum(r.items == got for r in runs) >= 2:
        return False, "answer stated twice"
    if norm == task.gold[:-1]:
        return False, "missing final period"
    if f" {task.gold} " in f" {norm} ":  # the gold sentence, whole, inside more text
        return False, "extra text around the answer"
    return False, "not in the expected form"


def grade(task, response):
    """Oracle-grade a response: 0..5 points and exactly 5 short reason lines.

    Never raises on any string (a non-string is converted with str())."""
    if not isinstance(response, str):
        response = str(response)
    kind = SPECS[task.family].kind
    runs = _runs(response, kind)
    got, several = _find_answer(task, runs)
    norm = " ".join(response.split())
    checks = (_number_checks if kind == "number" else _list_checks)(task, got, several, runs, norm)
    points, reasons = 0, []
    for name, (ok, why) in zip(CRITERIA, checks):
        reasons.append(f"+{int(ok)} {name}: {why}")
        if not ok:
            break
        points += 1
    for name in CRITERIA[len(reasons):]:
        reasons.append(f"+0 {name}: earlier point missing")
    return Grade(points, reasons)


def grade_prompt(prompt, response):
    """Oracle-grade a response to a prompt string; None if the prompt is not a known task."""
    task = parse_task(prompt)
    return None if task is None else grade(task, response)


# -----------------------------------------------------------------------------
# 4. Corruptions: responses of a chosen quality
#
#   gold          the gold sentence                                             -> 5
#   partly_wrong  gold form, answer damaged (swap, drop, replace, off by n)     -> 0..3
#   wrong_kind    an answer of another family's kind ("The sum is 21." to a sort) -> 0
#   verbose       gold wrapped in chatty filler                                 -> 4
#   repeated      the gold sentence said twice                                  -> 4
#   looping       the last item stuck in a loop, never ended                    -> 0..1
#   truncated     gold cut off at a random character                            -> 0..4
#   no_answer     an evasive sentence with no answer                            -> 0
#   echo          the prompt repeated back                                      -> 0..4

CORRUPTIONS = ["gold", "partly_wrong", "wrong_kind", "verbose", "repeated", "looping",
               "truncated", "no_answer", "echo"]

# Filler phrases contain no digits and no lexicon words, so they never add answer items.
_OPENERS = ["Sure!", "Of course.", "Happy to help.", "Let me work this out.",
            "Good question.", "Okay, here you go."]
_CLOSERS = ["I hope this helps.", "Let me know if you need anything else.",
            "That was an easy one.", "Have a nice day!", "Thanks for asking."]
_NO_ANSWER = ["I am not sure.", "Sorry, I cannot answer that.", "I do not know.",
              "Let me think about it.", "That is a hard question.", "Hmm, good question."]


def _damage_list(task, rng):
    """One plausible mistake on a list answer (may rarely leave it unchanged)."""
    items, fam = list(task.answer), task.family
    numeric = SPECS[fam].kind == "num_list"
    mode = rng.choice(["swap", "drop", "replace", "special"])
    if mode == "swap":
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
    elif mode == "drop":
        del items[rng.randrange(len(items))]
    elif mode == "replace":
        i = rng.randrange(len(items))
        if numeric:  # an off-by-one or a stray number
            items[i] = items[i] + rng.choice((-1, 1)) if rng.random() < 0.5 else rng.randint(0, 99)
            items[i] = abs(items[i])
        else:
            items[i] = rng.choice(LEXICON)
    elif fam in ("sort_asc", "sort_desc", "reverse"):
        items = list(task.args[0])  # gave the input back unchanged
    elif fam == "first_k":
        k, ws = task.args
        items = list(ws[1:k + 1])  # window shifted by one
    elif fam == "last_k":
        k, ws = task.args
        items = list(ws[-k - 1:-1])
    elif fam == "repeat":
        w, k = task.args
        items = [rng.choice(LEXICON)] * k if rng.random() < 0.5 else [w] * (k + rng.choice((-1, 1)))
    return tuple(items)


def _damage_number(task, rng):
    """A wrong number: off by one, off by a bit, or far off."""
    spec, ans = SPECS[task.family], task.answer
    d = rng.choice([spec.near, rng.randint(spec.near + 1, spec.far),
                    rng.randint(spec.far + 1, spec.far + 20)])
    wrong = ans + d * rng.choice((-1, 1))
    return wrong if wrong >= 0 else ans + d


def _wrong_kind(task, rng):
    """An answer of the wrong kind for the task (always 0 points)."""
    kind, args = SPECS[task.family].kind, task.args
    if kind == "num_list":
        xs = args[0]
        return rng.choice([f"The sum is {sum(xs)}.", f"The largest is {max(xs)}.",
                           f"The list has {len(xs)} items."])
    if kind == "word_list":
        ws = args[1] if isinstance(args[1], tuple) else (args[0],) * args[1]
        return rng.choice([f"The count is {rng.randint(0, 5)}.", f"The list has {len(ws)} items.",
                           f"The sum is {rng.randint(2, 99)}."])
    if task.family in ("max", "min"):
        xs = args[0]
        return rng.choice([f"Sorted: {_join(sorted(xs))}.", f"Reversed: {_join(xs[::-1])}."])
    if task.family in ("add", "sub"):
        w = rng.choice(LEXICON)
        return rng.choice([f"Sorted: {_join(sorted(args))}.", f"Repeated: {w} {w}."])
    ws = args[-1]  # count, length: answer with words instead of a number
    return rng.choice([f"Reversed: {_join(ws[::-1])}.", f"Repeated: {ws[0]} {ws[0]}."])


def corrupt(task, rng, kind):
    """A response to `task` of the given quality kind (one of CORRUPTIONS)."""
    if kind == "gold":
        return task.gold
    if kind == "partly_wrong":
        damage = _damage_number if SPECS[task.family].kind == "number" else _damage_list
        for _ in range(50):
            wrong = damage(task, rng)
            if wrong != task.answer:
                return render(task.family, task.args, wrong)
        return render(task.family, task.args, task.answer[:-1])  # unreachable in practice
    if kind == "wrong_kind":
        return _wrong_kind(task, rng)
    if kind == "verbose":
        opener = rng.choice(_OPENERS) if rng.random() < 0.7 else ""
        closer = rng.choice(_CLOSERS) if not opener or rng.random() < 0.5 else ""
        return " ".join(s for s in (opener, task.gold, closer) if s)
    if kind == "repeated":
        return task.gold + " " + task.gold  # not 3 times: judge prompts must fit the context
    if kind == "looping":
        ans = task.answer
        last = ans[-1] if isinstance(ans, tuple) else ans
        return task.gold[:-1] + f" {last}" * rng.randint(3, 6)
    if kind == "truncated":
        return task.gold[:rng.randint(1, len(task.gold) - 1)]
    if kind == "no_answer":
        return rng.choice(_NO_ANSWER)
    if kind == "echo":
        return task.prompt
    raise ValueError(f"unknown corruption kind {kind!r}; expected one of {CORRUPTIONS}")


# -----------------------------------------------------------------------------
# 5. Data sets
#
# Every generator derives its own random stream from (name, seed), so pretrain_corpus(1)
# and ift_seed(1) are unrelated. Train generators draw only non-held-out tasks and
# eval generators only held-out ones, so the two never share a task (a task_key).

# How the "web" answers: ~40% gold, the rest the typical mistakes of a weak model.
CORPUS_MIX = {
    "gold": 0.40, "partly_wrong": 0.18, "verbose": 0.10, "truncated": 0.08,
    "repeated": 0.07, "wrong_kind": 0.07, "looping": 0.04, "echo": 0.03, "no_answer": 0.03,
}


def _rng(name, seed):
    # str seeds are hashed with sha512 by random.Random: stable across runs and machines
    return random.Random(f"tinyalign/{name}/{seed}")


def _corpus_response(task, rng):
    kind = rng.choices(list(CORPUS_MIX), weights=list(CORPUS_MIX.values()))[0]
    return corrupt(task, rng, kind)


def pretrain_corpus(seed, n_docs):
    """n_docs plain-text documents: Q/A pages, chat logs and numbered task lists.

    Answers in the documents are drawn from CORPUS_MIX, so a model that imitates the corpus
    is right only some of the time. Task lists teach the model to write new prompts when
    shown "1. ... 2. ... 3." (few-shot prompt generation in the self-rewarding loop)."""
    rng = _rng("corpus", seed)
    docs = []
    for _ in range(n_docs):
        style = rng.choices(["qa", "chat", "list"], weights=[0.45, 0.35, 0.20])[0]
        if style == "qa":
            q, a = rng.choice([("Q: ", "A: "), ("Question: ", "Answer: ")])
            pairs = []
            for _ in range(rng.choice([1, 1, 2, 3, 4])):
                task = sample_task(rng, split="train")
                pairs.append(f"{q}{task.prompt}\n{a}{_corpus_response(task, rng)}")
            docs.append("\n\n".join(pairs))
        elif style == "chat":
            turns = []
            for _ in range(rng.choice([1, 2, 3])):
                task = sample_task(rng, split="train")
                turns.append(f"User: {task.prompt}\nAssistant: {_corpus_response(task, rng)}")
            docs.append("\n".join(turns))
        else:
            head = rng.choice(["Tasks:", "Practice questions:", "Exercises:",
                               "Some things to ask an assistant:"])
            lines = [f"{i + 1}. {sample_task(rng, split='train').prompt}"
                     for i in range(rng.randint(3, 6))]
            docs.append("\n".join([head] + lines))
    return docs


def ift_seed(seed, n):
    """n (instruction, gold response) pairs from training tasks, families balanced,
    instructions distinct."""
    rng = _rng("ift", seed)
    out, seen = [], set()
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(100):  # distinct prompts; the task space is large, this rarely loops
            task = sample_task(rng, family, split="train")
            if task.prompt not in seen:
                break
        seen.add(task.prompt)
        out.append((task.prompt, task.gold))
    rng.shuffle(out)
    return out


# -----------------------------------------------------------------------------
# 6. The judge's target output


def asked_for(task):
    """What a question asks for, in the judge's words: the kind and the size of the answer."""
    kind = SPECS[task.family].kind
    if kind == "number":
        return "one number"
    return f"a list of {len(task.answer)} {'numbers' if kind == 'num_list' else 'words'}"


def judge_target(task, grade):
    """What the judge should write: first what the question asks for, then per criterion what
    it finds and only THEN its point, then "Score: k". Both orders matter to a small judge:
    it must read the question before the response (a judge that skips it calls
    "The largest is 88." relevant to a sorting question), and it decides a point better
    after writing the evidence than before (reason first, then verdict)."""
    lines = [f"Asked for: {asked_for(task)}."]
    for reason in grade.reasons:  # "+1 relevant: gives a list of numbers"
        point, finding = reason.split(" ", 1)
        lines.append(f"{finding}: {point}")
    return "\n".join(lines + [f"Score: {grade.points}"])


# To reach a target score quickly we draw corruption kinds that often produce it, then keep
# the sample only if the oracle gives exactly that score (rejection sampling).
_KINDS_FOR_SCORE = {
    5: ["gold"],
    4: ["verbose", "repeated", "truncated"],
    3: ["partly_wrong", "echo"],
    2: ["partly_wrong", "truncated", "echo"],
    1: ["partly_wrong", "looping", "truncated"],
    0: ["wrong_kind"] * 4 + ["no_answer", "truncated", "looping", "echo", "partly_wrong"],
}


# Target scores of the EFT examples, in turn: every score, and 0 twice. Most zeros are answers
# of the wrong kind ("The largest is 88." to a sorting question): without many of them a
# judge learns that the response alone tells the question's kind, and never reads the
# question; a policy's commonest mistake is exactly that one.
EFT_SCORES = [0, 0, 1, 2, 3, 4, 5]


def answer_of(task, response):
    """The answer a response states, read as the oracle reads it: a tuple of items for list
    families, a number for number families; None when it states none, or several."""
    got, several = _find_answer(task, _runs(response or "", SPECS[task.family].kind))
    if got is None or several:
        return None
    if SPECS[task.family].kind == "number":
        return got[0] if len(got) == 1 else None
    return tuple(got)


def with_answer(task, answer):
    """The task as if `answer` were its right answer (and render(answer) its gold sentence):
    what a reference-guided judge grades against when the reference says `answer`."""
    return Task(task.family, task.prompt, task.args, answer, render(task.family, task.args, answer))


def eft_reference(task, rng):
    """The reference of a reference-guided EFT example: the gold sentence half of the time,
    else a well-formed wrong answer, as a model's own answer often is. The target is graded
    against the reference, right or wrong, so the judge learns to compare the response with
    the reference it is given (what it will be given is its own answer)."""
    if rng.random() < 0.5:
        return task
    answer = answer_of(task, corrupt(task, rng, "partly_wrong"))
    return task if answer is None else with_answer(task, answer)


def eft_seed(seed, n, pool=None, pool_share=0.5, reference=False, group=1):
    """n EFT examples on training tasks: (instruction, response, judge target) triples, or with
    reference=True (instruction, response, judge target, reference) -- judge.fill puts them
    into the judge prompt.

    Balanced scores: example i gets the target score EFT_SCORES[i % 7] (then the list is
    shuffled), so each score 1..5 appears about n / 7 times and 0 twice as often (most zeros
    are answers of the wrong kind). A judge trained on the natural mix would mostly see 5s and
    learn to say 5.

    pool: optional (task, response) pairs that a model wrote itself. A judge trained only on
    this file's corruptions meets, in the self-rewarding loop, a policy whose mistakes look
    different, and misjudges them; so about pool_share of each score's examples come from the
    pool when it has responses of that score (graded here by the oracle), the rest are
    corruptions.

    reference: every example carries a reference answer (eft_reference: gold or a well-formed
    wrong answer) and is graded against it; the judge of the self-rewarding loop is then given
    the model's own answer as the reference (reference-guided judging, Zheng et al. 2023).

    group: responses per question. 1: every example is a different question, and a judge can
    lower its loss by guessing the findings from the question alone (issue 17 found M1 doing
    exactly that). g > 1: eft_groups -- each question comes with up to g responses of
    different scores, so only reading the response lowers the loss."""
    if group > 1:
        return eft_groups(seed, n, group, pool, pool_share, reference)
    rng = _rng("eft", seed)
    by_score = {s: [] for s in range(6)}
    for task, response in pool or []:
        graded = eft_reference(task, rng) if reference else task
        by_score[grade(graded, response).points].append((graded, response))
    for items in by_score.values():
        rng.shuffle(items)
    out, seen = [], set()
    for i in range(n):
        target = EFT_SCORES[i % len(EFT_SCORES)]
        task = None
        if by_score[target] and rng.random() < pool_share:
            while by_score[target] and task is None:
                task, response = by_score[target].pop()
                if (task.prompt, response) in seen:
                    task = None
        if task is None:
            for _ in range(10_000):
                task = sample_task(rng, split="train")
                if reference:
                    task = eft_reference(task, rng)
                response = corrupt(task, rng, rng.choice(_KINDS_FOR_SCORE[target]))
                if grade(task, response).points == target and (task.prompt, response) not in seen:
                    break
            else:
                raise RuntimeError(f"could not sample an EFT example with score {target}")
        seen.add((task.prompt, response))
        example = (task.prompt, response, judge_target(task, grade(task, response)))
        out.append(example + (task.gold,) if reference else example)
    rng.shuffle(out)
    return out


def eft_groups(seed, n, group, pool=None, pool_share=0.5, reference=False):
    """n EFT examples in groups (eft_group_list): one training question with up to `group`
    responses of different scores. Returns what eft_seed returns, shuffled, so a group is
    spread over batches."""
    rng = _rng("eft-groups", seed)
    out = []
    for graded, responses in eft_group_list(rng, n, group, pool, pool_share, reference):
        for response in responses:
            example = (graded.prompt, response, judge_target(graded, grade(graded, response)))
            out.append(example + (graded.gold,) if reference else example)
    rng.shuffle(out)
    return out


def eft_group_list(rng, n, group, pool=None, pool_share=0.5, reference=False):
    """Questions with n responses in all: one training question with up to `group` responses that earn
    different scores -- the gold, its near misses (one item swapped, dropped or off by one),
    answers of the wrong kind, and with `pool` the policy's own samples of that question when
    they have a score the group needs. The target scores come in turn from EFT_SCORES, as in
    eft_seed, so the mix stays balanced: a score the group already has (but a second zero in a
    group of 4 or more), or that this question cannot reach, waits for the next group. Each
    question is used once. Returns [(task, its responses)], the task graded against (with
    reference=True, eft_reference's). rng: a random.Random, drawn from."""
    own = {}  # prompt -> (task, the policy's distinct responses, in order)
    for task, response in pool or []:
        rs = own.setdefault(task.prompt, (task, []))[1]
        if response not in rs:
            rs.append(response)
    pooled = list(own.values())
    rng.shuffle(pooled)
    out, used, queue, i, total = [], set(), [], 0, 0
    while total < n:
        if pooled and rng.random() < pool_share:
            task, mine = pooled.pop()
        else:
            task, mine = sample_task(rng, split="train"), []
        if task.prompt in used:
            continue
        used.add(task.prompt)
        graded = eft_reference(task, rng) if reference else task
        while len(queue) < group + len(EFT_SCORES):
            queue.append(EFT_SCORES[i % len(EFT_SCORES)])
            i += 1
        responses, scores = [], set()
        for j, target in enumerate(queue):
            if len(responses) == group:
                break
            if target in scores and not (target == 0 and group >= 4 and len(scores) >= 2):
                continue  # (a big group may hold two wrong answers: there are many ways to be wrong)
            response = next((r for r in mine if grade(graded, r).points == target and r not in responses), None)
            for _ in range(0 if response else 50):
                r = corrupt(graded, rng, rng.choice(_KINDS_FOR_SCORE[target]))
                if grade(graded, r).points == target:
                    response = r
                    break
            if response is not None and response not in responses:
                responses.append(response)
                scores.add(target)
                queue[j] = None  # served
        queue = [t for t in queue if t is not None]
        responses = responses[:n - total]
        if responses:
            out.append((graded, responses))
            total += len(responses)
    return out


def missed_point(g):
    """One response's line of a pairwise judgment: the first rubric point it misses (what the
    pointwise judge writes for it) and its points, e.g. "misses correct: wrong order, 3 points"."""
    first = next((r for r in g.reasons if r.startswith("+0")), None)
    if first is None:
        return "misses nothing, 5 points"
    return f"misses {first.split(' ', 1)[1]}, {g.points} points"


def pairwise_target(task, grade_a, grade_b):
    """What the pairwise judge should write (judge_prompt_pairwise.txt): what the question asks
    for, each response's first missed point and its points, then the verdict by the points."""
    verdict = "A" if grade_a.points > grade_b.points else "B" if grade_b.points > grade_a.points else "same"
    return "\n".join([f"Asked for: {asked_for(task)}.", f"A {missed_point(grade_a)}", f"B {missed_point(grade_b)}",
                      f"Better: {verdict}"])


def eft_pairs(seed, n, group, pool=None, pool_share=0.5):
    """n pairwise EFT examples (instruction, (response A, response B), target): every two
    responses of an EFT group (eft_group_list: the same training question, different scores,
    the policy's own samples among them), each pair in a random order, so A and B win about
    equally often. A group of g gives g (g - 1) / 2 of them."""
    if group < 2:
        raise ValueError("pairwise EFT needs groups of at least 2 responses per question (--eft_group >= 2)")
    rng = _rng("eft-pairs", seed)
    out = []
    # g responses to one question make g (g - 1) / 2 pairs, (g - 1) / 2 per response; groups come
    # out smaller where a question cannot reach a score, so ask for 1.5x that many responses, and
    # at least two groups' worth
    for task, responses in eft_group_list(rng, max(2 * group, -(-3 * n // (group - 1))), group, pool, pool_share):
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                a, b = (responses[i], responses[j]) if rng.random() < 0.5 else (responses[j], responses[i])
                out.append((task.prompt, (a, b), pairwise_target(task, grade(task, a), grade(task, b))))
    rng.shuffle(out)
    if len(out) < n:
        raise RuntimeError(f"pairwise EFT: only {len(out)} pairs for {n}")
    return out[:n]


def _new_heldout_task(rng, family, seen, tries=500):
    """A held-out task of `family` whose task_key is not in `seen`, or None if `tries` draws
    in a row found none (the family has run out: repeat has only about a dozen)."""
    for _ in range(tries):
        task = sample_task(rng, family, split="heldout")
        if task_key(task) not in seen:
            return task
    return None


def eval_prompts(seed, n):
    """n distinct held-out tasks for instruction following, families in turn (balanced).

    Distinct means distinct tasks (task_key), not distinct prompt strings: "Add 3 and 5." and
    "What is 5 plus 3?" are one task and would be counted twice. A small family runs out of
    held-out tasks (repeat has only about a dozen); once it does, it is dropped and the other
    families fill the rest, still in turn. So per-family counts differ by at most one except
    for families that have no held-out task left. Deterministic in seed."""
    rng = _rng("eval", seed)
    out, seen, families = [], set(), list(FAMILIES)
    while len(out) < n:
        if not families:
            raise RuntimeError(f"only {len(out)} distinct held-out tasks exist; asked for {n}")
        for family in list(families):  # a copy: exhausted families are removed on the way
            if len(out) == n:
                break
            task = _new_heldout_task(rng, family, seen)
            if task is None:
                families.remove(family)
                continue
            seen.add(task_key(task))
            out.append(task)
    return out


def eft_eval_set(seed, n_prompts, k):
    """Held-out reward-modeling set: per prompt, k distinct responses and their points.

    The prompts are eval_prompts(seed, n_prompts): distinct held-out tasks, families in turn
    until a small family runs out. Responses are drawn from all corruption kinds; while
    possible, each new response must also have a new score, so every prompt gets a spread
    of quality levels to rank."""
    rng = _rng("eft_eval", seed)
    out = []
    for task in eval_prompts(seed, n_prompts):
        responses, points = [], []
        for attempt in range(400):
            if len(responses) == k:
                break
            text = corrupt(task, rng, rng.choice(CORRUPTIONS))
            p = grade(task, text).points
            if text in responses or (p in points and attempt < 200 and len(set(points)) < 6):
                continue
            responses.append(text)
            points.append(p)
        if len(responses) < k:
            raise RuntimeError(f"could not find {k} distinct responses for {task.prompt!r}")
        out.append((task, responses, points))
    return out

"""Tests for the synthetic task world (tasks.py): grader, parser, corruptions, data sets."""

import random
import re
from collections import Counter

import pytest

import judge
import tasks
from tasks import CRITERIA, CORRUPTIONS, FAMILIES, grade, make_task, parse_task

# -----------------------------------------------------------------------------
# the grader on hand-written responses: every family, every score 0..5

# family -> (args, {points: [responses that must get exactly these points]})
HAND = {
    "sort_asc": (((5, 2, 9),), {
        0: ["The sum is 16.", "I do not know.", "Sorted: 2."],
        1: ["Sorted: 2 5.", "Sorted: 2 5 9 9 9"],
        2: ["Sorted: 2 5 8.", "2 5 5"],
        3: ["Sorted: 5 2 9.", "Sort these numbers in ascending order: 5 2 9"],
        4: ["Sorted: 2 5 9", "Sorted: 2, 5 and 9.", "Sure! Sorted: 2 5 9.",
            "Sorted: 2 5 9. Sorted: 2 5 9."],
        5: ["Sorted: 2 5 9.", "  Sorted:\t2  5 9. \n"],
    }),
    "sort_desc": (((5, 2, 9),), {
        0: ["The largest is 9.", ""],
        1: ["Sorted: 9 5 2 2 2", "Sorted: 9 5."],
        2: ["Sorted: 9 5 1."],
        3: ["Sorted: 2 5 9."],
        4: ["Sure! Sorted: 9 5 2. Thanks for asking."],
        5: ["Sorted: 9 5 2."],
    }),
    "reverse": (((1, 7, 3),), {
        0: ["Reversed.", "Reversed: 3"],
        1: ["Reversed: 3 7."],
        2: ["Reversed: 3 7 2."],
        3: ["Reversed: 1 7 3.", "Reversed: 1, 3, 7."],
        4: ["Reversed: 3 7 1. Reversed: 3 7 1.", "3 7 1"],
        5: ["Reversed: 3 7 1."],
    }),
    "add": ((12, 30), {
        0: ["The sum is 12 30.", "forty-two", "The sum is ."],
        1: ["The sum is 60.", "The sum is 0."],
        2: ["The sum is 45.", "The sum is 32."],
        3: ["The sum is 43.", "The sum is 41."],
        4: ["The sum of 12 and 30 is 42.", "42", "The sum is 42"],
        5: ["The sum is 42."],
    }),
    "sub": ((50, 8), {
        0: ["Fifty minus eight.", "The difference is 50 8."],
        1: ["The difference is 58."],
        2: ["The difference is 40."],
        3: ["The difference is 41."],
        4: ["The difference is 42", "The difference is 42. The difference is 42."],
        5: ["The difference is 42."],
    }),
    "max": (((4, 81, 17),), {
        0: ["The largest is 4 81 17.", "Sorted: 4 17 81."],
        1: ["The largest is 17."],
        2: ["The largest is 79."],
        3: ["The largest is 80."],
        4: ["81", "The largest is 81. I hope this helps."],
        5: ["The largest is 81."],
    }),
    "min": (((4, 81, 17),), {
        0: ["", "Which is smallest?"],
        1: ["The smallest is 17."],
        2: ["The smallest is 6."],
        3: ["The smallest is 5.", "The smallest is 3."],
        4: ["The smallest is 4. The smallest is 4."],
        5: ["The smallest is 4."],
    }),
    "count": (("cat", ("cat", "dog", "cat")), {
        0: ["The count is cat cat.", "Repeated: cat cat."],
        1: ["The count is 5."],
        2: ["The count is 4.", "The count is 0."],
        3: ["The count is 3.", "The count is 1."],
        4: ["It is 2, I think.", "The count is 2"],
        5: ["The count is 2."],
    }),
    "length": ((("red", "sun", "box", "cup"),), {
        0: ["red sun box cup", "The list has 4 5 items."],
        1: ["The list has 9 items."],
        2: ["The list has 6 items.", "The list has 2 items."],
        3: ["The list has 5 items."],
        4: ["The list has 4 items. I hope this helps.", "The list has 4 items"],
        5: ["The list has 4 items."],
    }),
    "repeat": (("dog", 3), {
        0: ["Repeated: 3.", "dog"],
        1: ["Repeated: dog dog.", "Repeated: dog dog dog dog."],
        2: ["Repeated: cat cat dog.", "Repeated: cat cat cat."],
        3: ["Repeated: dog cat dog."],
        4: ["dog dog dog", "Repeated: dog, dog and dog."],
        5: ["Repeated: dog dog dog."],
    }),
    "first_k": ((2, ("red", "sun", "box", "cup")), {
        0: ["First 2: red.", "The list has 4 items."],
        1: ["First 2: red sun box."],
        2: ["First 2: sun box."],
        3: ["First 2: sun red."],
        4: ["First 2: RED SUN.", "red sun"],
        5: ["First 2: red sun."],
    }),
    "last_k": ((2, ("red", "sun", "box", "cup")), {
        0: ["Last 2: 3 4.", "Last 2: cup."],
        1: ["Last 2: sun box cup."],
        2: ["Last 2: sun box."],
        3: ["Last 2: cup box."],
        4: ["Last 2: box cup", "Okay, here you go. Last 2: box cup."],
        5: ["Last 2: box cup."],
    }),
}

HAND_CASES = [(fam, pts, resp) for fam, (_, table) in HAND.items()
              for pts, resps in table.items() for resp in resps]


def test_hand_table_covers_every_family_and_score():
    assert set(HAND) == set(FAMILIES)
    for fam, (_, table) in HAND.items():
        assert sorted(table) == [0, 1, 2, 3, 4, 5], fam


def _check_reasons(g):
    """Structure every Grade must have: 5 short lines, one per criterion, +1s first."""
    assert 0 <= g.points <= 5
    assert len(g.reasons) == 5
    for name, line in zip(CRITERIA, g.reasons):
        assert re.fullmatch(rf"\+[01] {name}: \S.*", line), line
        assert len(line.split()) <= 9, line
    marks = [line[1] for line in g.reasons]
    assert marks == ["1"] * g.points + ["0"] * (5 - g.points)  # strictly cumulative


@pytest.mark.parametrize("family,points,response", HAND_CASES)
def test_grader_hand_written(family, points, response):
    args, _ = HAND[family]
    task = make_task(family, args)
    g = grade(task, response)
    assert g.points == points, (response, g.reasons)
    _check_reasons(g)


def test_gold_of_hand_tasks_is_what_the_table_calls_5():
    for fam, (args, table) in HAND.items():
        assert make_task(fam, args).gold == table[5][0]


def test_reason_lines_say_what_went_wrong():
    t = make_task("sort_asc", ((5, 2, 9),))
    assert grade(t, "Sorted: 5 2 9.").reasons[3] == "+0 correct: wrong order"
    assert grade(t, "Sorted: 2 5.").reasons[1] == "+0 substantial: wrong number of items"
    assert grade(t, "Sorted: 2 5.").reasons[2:] == [
        "+0 basic elements: earlier point missing", "+0 correct: earlier point missing",
        "+0 impeccable: earlier point missing"]
    assert grade(t, "Sorted: 2 5 9. Sorted: 2 5 9.").reasons[4] == "+0 impeccable: answer stated twice"
    assert grade(t, "Sorted: 2 5 9").reasons[4] == "+0 impeccable: missing final period"
    assert grade(t, "Sure! Sorted: 2 5 9.").reasons[4] == "+0 impeccable: extra text around the answer"
    assert grade(t, "Sorted: 2 5 9.").reasons[4] == "+1 impeccable: clean, stated once"
    a = make_task("add", (12, 30))
    assert grade(a, "Sorted: 12 30.").reasons[0] == "+0 relevant: several numbers, not one"
    assert grade(a, "no idea").reasons[0] == "+0 relevant: no number given"
    assert grade(a, "The sum is 43.").reasons[3] == "+0 correct: off by one"


def test_answer_is_last_statement():
    # the final statement counts: a later statement corrects an earlier one
    t = make_task("sort_asc", ((5, 2, 9),))
    assert grade(t, "Sorted: 2 5 9. No wait: 9 5 2.").points == 3
    assert grade(t, "Sorted: 9 5 2. No wait: 2 5 9.").points == 4


# Human-grader cases: how a careful person grades a response that carries extra words.
# (family, args, response, points, the first line that is not +1, or None for "all +1")
# The rubric says extra text costs only "impeccable"; offering several answers is not
# answering at all (it fails "relevant", as "The sum is 12 30." always did).
NUMS, LISTS = "+0 relevant: several numbers, not one", "+0 relevant: several lists, not one"
XS, WS, CAT = ((5, 1, 5, 3),), (2, ("red", "sun", "box", "cup")), ("cat", ("cat", "dog", "cat"))
HUMAN = [
    # number families: the answer is the answer statement, not the last number in sight
    ("add", (5, 7), "The sum is 12.0.", 4, "+0 impeccable: not in the expected form"),
    ("add", (5, 7), "The sum is 12. (5 + 7)", 4, "+0 impeccable: extra text around the answer"),
    ("add", (5, 7), "The sum of 5 and 7 is 12.", 4, "+0 impeccable: not in the expected form"),
    ("add", (5, 7), "5 + 7 = 12", 4, None),
    ("add", (5, 7), "What is 5 plus 7? 12", 4, None),
    ("add", (5, 7), "The answer: [12]", 4, None),
    ("add", (5, 7), "The sum is 13. No wait, the sum is 12.", 4, None),  # a correction
    ("add", (12, 0), "The sum of 12 and 0 is 12.", 4, None),  # the answer is also an input
    ("add", (12, 0), "The sum is 12. (12 + 0)", 4, "+0 impeccable: answer stated twice"),
    ("max", ((5, 97, 12),), "The largest is 97 in 5 97 12.", 4, None),
    ("max", ((5, 97, 12),), "Which is biggest: 5 97 12? 97", 4, None),
    ("max", ((5, 97, 12),), "The largest of 5, 97 and 12 is 97.", 4, None),
    ("sub", (50, 8), "50 - 8 = 42", 4, None),
    ("sub", (50, 8), "The difference is 42. (50 - 8)", 4, None),
    ("count", CAT, "The count is 2.0.", 4, None),
    ("length", (("red", "sun", "box", "cup"),), "There are 4 items.", 4, None),
    # ... and what is wrong stays wrong
    ("add", (5, 7), "The sum is 12.5.", 3, "+0 correct: not a whole number"),
    ("add", (5, 7), "The sum is 12 30.", 0, NUMS),
    ("add", (5, 7), "The sum is 12 or 13.", 0, NUMS),
    ("add", (5, 7), "The sum is 13 or 12.", 0, NUMS),
    ("add", (5, 7), "The sum is 12. Or maybe 13.", 0, NUMS),
    ("add", (5, 7), "13 or 12", 0, NUMS),
    ("add", (5, 7), "The sum is 12/13.", 0, NUMS),
    ("add", (5, 7), "The sum is 12 or 5.", 0, NUMS),  # an input offered as an answer
    ("add", (5, 7), "The sum is 12. The sum is 13.", 3, "+0 correct: off by one"),  # corrected
    ("max", ((5, 97, 12),), "The largest is 97 or 12.", 0, NUMS),
    ("sub", (50, 8), "The difference is 50-8.", 0, NUMS),
    ("sub", (70, 0), "What is 70 minus 0?", 1, "+0 substantial: far from the answer"),  # a question
    ("count", CAT, "The count is 2 or 3.", 0, NUMS),
    # list families: separators, decimals, brackets, the input quoted back
    ("sort_asc", XS, "Sorted: 1-3-5-5.", 4, "+0 impeccable: not in the expected form"),
    ("sort_asc", XS, "Sorted: 1; 3; 5; 5.", 4, None),
    ("sort_asc", XS, "Sorted: 1.0 3.0 5.0 5.0.", 4, None),
    ("sort_asc", XS, "Sorted: [1, 3, 5, 5].", 4, None),
    ("sort_asc", XS, "Sorted: 1 3 5 5 (from 5 1 5 3).", 4, None),
    ("sort_asc", XS, "The sorted list is 1 3 5 5.", 4, None),
    ("reverse", ((1, 7, 3),), "Reversed: 3 7 1 (was 1 7 3).", 4, None),
    ("first_k", WS, "First 2: red-sun.", 4, None),
    ("first_k", WS, "The first 2 are red and sun.", 4, None),
    ("first_k", WS, "First 2: red sun (of red sun box cup).", 4, None),
    ("last_k", WS, "Last 2: box; cup.", 4, None),
    ("repeat", ("dog", 3), "Repeated: dog-dog-dog.", 4, None),
    # ... and wrong lists stay wrong
    ("sort_asc", XS, "Sorted: 1-3-5-6.", 2, "+0 basic elements: numbers differ from given"),
    ("sort_asc", XS, "Sorted: 1.5 3 5 5.", 2, None),
    ("sort_asc", XS, "Sorted: 1 3 5 5 or 5 5 3 1.", 0, LISTS),
    ("sort_asc", XS, "Sorted: 1 3 5 5. Maybe 1 5 3 5.", 0, LISTS),
    ("sort_asc", XS, "Sorted: 1 3 5 5. Maybe 5 1 5 3.", 0, LISTS),  # the input, offered
    ("sort_asc", XS, "5 1 5 3 or 1 3 5 5", 0, LISTS),
    ("sort_asc", XS, "Sorted: either 5 1 5 3 or 1 3 5 5.", 0, LISTS),
    ("reverse", ((1, 7, 3),), "Reversed: 3 7 1 or 3 1 7.", 0, LISTS),
    ("reverse", ((1, 7, 3),), "Reversed: 3 7 1 or 1 7 3.", 0, LISTS),
    ("first_k", WS, "First 2: red sun or sun box.", 0, LISTS),
]


@pytest.mark.parametrize("family,args,response,points,first_miss", HUMAN)
def test_grader_reads_like_a_human(family, args, response, points, first_miss):
    g = grade(make_task(family, args), response)
    assert g.points == points, (response, g.reasons)
    _check_reasons(g)
    if first_miss is not None:
        assert g.reasons[points] == first_miss, g.reasons


def _kind(task):
    return tasks.SPECS[task.family].kind


def _text(answer, sep=" "):
    """An answer (a tuple or a number) written out."""
    return sep.join(map(str, answer)) if isinstance(answer, tuple) else str(answer)


def _other_answer(task, rng):
    """A wrong answer of the right kind: a number, or a list of >= 2 items."""
    while True:
        if _kind(task) == "number":
            other = task.answer + rng.choice([-1, 1, 2, 7, 30])
        else:
            other = tasks._damage_list(task, rng)
            if len(other) < 2:
                continue
        if other != task.answer:
            return other


def _given(task):
    """The task's input as the question gives it: its list, or its two numbers."""
    lists = [a for a in task.args if isinstance(a, tuple)]
    return _text(lists[0]) if lists else " and ".join(map(str, task.args))


def test_several_answers_never_earn_correct():
    # The new reading must not be easier to game than "the last run" was: a response that
    # hedges between the right answer and another one gets nothing, in whatever order, even
    # when the other one is the question's own input ("Reversed: 3 7 1 or 1 7 3.").
    rng = random.Random(11)
    for _ in range(600):
        task = tasks.sample_task(rng)
        right, wrong = _text(task.answer), _text(_other_answer(task, rng))
        given = _given(task)
        say = lambda ans: tasks.render(task.family, task.args, ans)  # noqa: E731
        texts = [say(f"{right} or {wrong}"), say(f"{wrong} or {right}"),
                 say(f"{right} / {wrong}"), f"{task.gold} Or maybe {wrong}.",
                 f"{task.gold} Perhaps {wrong}.", f"Either {wrong} or {right}.",
                 f"{right} or {wrong}", f"{wrong} or {right}"]
        if task.family not in ("count", "length", "repeat"):  # their input is no answer item
            texts += [say(f"{right} or {given}"), f"{given} or {right}"]
        for text in texts:
            g = grade(task, text)
            assert g.points == 0 and "several" in g.reasons[0], (task.prompt, text, g.reasons)


def test_extra_words_cost_only_the_fifth_point():
    rng = random.Random(12)
    for _ in range(600):
        task = tasks.sample_task(rng)
        say = lambda ans: tasks.render(task.family, task.args, ans)  # noqa: E731
        wrong = _other_answer(task, rng)
        texts = [f"Sure! {task.gold} Have a nice day!",
                 f"{task.gold[:-1]} (from {_given(task)}).",
                 f"{task.prompt} {task.gold}",  # the question repeated, then answered
                 f"{say(wrong)} No wait. {task.gold}"]  # a corrected mistake
        if _kind(task) != "number":
            texts += [say(_text(task.answer, "-")), say(_text(task.answer, "; "))]
        if _kind(task) != "word_list":
            texts.append(say(_text(task.answer, ".0 ") + ".0"))
        for text in texts:
            g = grade(task, text)
            assert g.points == 4, (task.prompt, text, g.reasons)


# -----------------------------------------------------------------------------
# fuzzing the grader: it never raises and always returns a well-formed Grade

def _fuzz_strings(rng):
    pieces = tasks.LEXICON + [str(i) for i in range(120)] + [
        ",", ".", ":", "and", "-", "-3", "Sorted:", "The sum is", "First 2:", "{", "}",
        "\n", "  ", "é", "\u202e", "\x00", "🙂", "9" * 50, "Score: 5", "+1 relevant:"]
    out = ["", " ", ".", "0", "-", "and and and", "9" * 5000, "1 " * 20000, "cat " * 20000,
           "x" * 200_000, "\ud800", "\ufffd", "١٢٣", "Ⅻ", "²³"]
    for _ in range(300):  # random unicode, including astral planes
        out.append("".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF),
                                            rng.randint(0xE000, 0x10FFFF)]))
                           for _ in range(rng.randint(0, 60))))
    for _ in range(500):  # soup of answer-like tokens
        out.append(" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))))
    return out


def test_grader_fuzz_never_raises():
    rng = random.Random(0)
    strings = _fuzz_strings(rng)
    for i, family in enumerate(FAMILIES):
        task = tasks.sample_task(random.Random(i), family)
        for s in strings:
            _check_reasons(grade(task, s))
        for kind in CORRUPTIONS:
            for _ in range(20):
                _check_reasons(grade(task, tasks.corrupt(task, rng, kind)))
    # not a string at all: converted, not crashed
    _check_reasons(grade(tasks.sample_task(rng), None))


# -----------------------------------------------------------------------------
# corruptions

# the score each corruption kind is defined to have (inclusive range)
EXPECTED = {
    "gold": (5, 5), "partly_wrong": (0, 3), "wrong_kind": (0, 0), "verbose": (4, 4),
    "repeated": (4, 4), "looping": (0, 1), "truncated": (0, 4), "no_answer": (0, 0),
    "echo": (0, 4),
}


def test_corruption_scores():
    assert set(EXPECTED) == set(CORRUPTIONS)
    rng = random.Random(1)
    seen = {kind: Counter() for kind in CORRUPTIONS}
    for _ in range(3000):
        task = tasks.sample_task(rng)
        for kind in CORRUPTIONS:
            text = tasks.corrupt(task, rng, kind)
            p = grade(task, text).points
            lo, hi = EXPECTED[kind]
            assert lo <= p <= hi, (kind, task, text, p)
            assert (text == task.gold) == (kind == "gold"), (kind, text)
            seen[kind][p] += 1
    # partly_wrong must produce the middle levels, not just one of them
    assert all(seen["partly_wrong"][p] > 100 for p in (1, 2, 3)), seen["partly_wrong"]


def test_corrupt_rejects_unknown_kind():
    with pytest.raises(ValueError):
        tasks.corrupt(tasks.sample_task(random.Random(0)), random.Random(0), "sarcastic")


# -----------------------------------------------------------------------------
# parse_task

def test_parse_round_trips_every_family_and_phrasing():
    rng = random.Random(2)
    for family in FAMILIES:
        for phrasing in range(len(tasks.SPECS[family].templates)):
            for comma in (False, True):
                for _ in range(10):
                    task = make_task(family, tasks._sample_args(rng, family), phrasing, comma)
                    assert parse_task(task.prompt) == task, task.prompt


def test_parse_round_trips_sampled_tasks():
    rng = random.Random(3)
    for _ in range(2000):
        task = tasks.sample_task(rng)
        assert parse_task(task.prompt) == task


def test_parse_is_lenient_with_surface_form():
    t = parse_task("  sort these numbers in ascending order:   4, 1 and 7 . ")
    assert t is not None and t.family == "sort_asc" and t.answer == (1, 4, 7)
    t = parse_task("What is 3 plus 4")
    assert t is not None and t.answer == 7 and t.gold == "The sum is 7."
    t = parse_task("Repeat the word CAT 2 times!")
    assert t is not None and t.args == ("cat", 2)


@pytest.mark.parametrize("prompt", [
    "", "Hello there", "Sort these numbers: 3 1 2",  # unknown phrasing
    "Repeat the word zebra 3 times.",                # not a lexicon word
    "Sort these numbers in ascending order: 5",      # a list of one
    "Give the first 5 items of: red sun",            # k larger than the list
    "Say cat 1 times.",                              # k too small to make a list
    "What is 1 plus 2?" * 100,                       # far too long
])
def test_parse_rejects(prompt):
    assert parse_task(prompt) is None


def test_parse_fuzz_never_raises():
    rng = random.Random(4)
    for s in _fuzz_strings(rng)[:600]:
        t = parse_task(s)
        assert t is None or t.family in FAMILIES
    assert parse_task(None) is None


# -----------------------------------------------------------------------------
# determinism, seeds and the held-out split

def _all_outputs(seed):
    return (tasks.pretrain_corpus(seed, 40), tasks.ift_seed(seed, 40), tasks.eft_seed(seed, 30),
            tasks.eval_prompts(seed, 30), tasks.eft_eval_set(seed, 10, 4))


def test_deterministic_and_independent_of_global_rng():
    random.seed(123)
    a = _all_outputs(7)
    random.seed(456)
    b = _all_outputs(7)
    assert a == b
    c = _all_outputs(8)
    for x, y in zip(a, c):
        assert x != y


def test_heldout_split():
    rng = random.Random(5)
    draws = [tasks.sample_task(rng) for _ in range(4000)]
    frac = sum(map(tasks.is_heldout, draws)) / len(draws)
    assert 0.07 < frac < 0.13
    for t in draws[:200]:  # the split depends on (family, args), never on the phrasing
        other = make_task(t.family, t.args, phrasing=1, comma=True)
        assert tasks.is_heldout(other) == tasks.is_heldout(t)
    assert all(tasks.is_heldout(tasks.sample_task(rng, split="heldout")) for _ in range(200))
    assert not any(tasks.is_heldout(tasks.sample_task(rng, split="train")) for _ in range(200))


def _corpus_prompts(docs):
    out = []
    for d in docs:
        out += re.findall(r"^(?:Q|Question|User): (.*)$", d, re.M)
        out += re.findall(r"^\d+\. (.*)$", d, re.M)
    return out


# A task's identity is what decides its answer: "add 3 and 5" and "add 5 and 3" are one task.
# Written out here independently of tasks.task_key, which the tests below check against it.
_ORDER_FREE = ("add", "sort_asc", "sort_desc", "max", "min", "length", "count")


def _multiset(xs):
    return tuple(sorted(Counter(xs).items()))


def _canon(task):
    """A task up to the input orders its answer ignores."""
    fam, args = task.family, task.args
    if fam == "add":
        return fam, _multiset(args)
    if fam in ("sort_asc", "sort_desc", "max", "min", "length"):
        return fam, _multiset(args[0])
    if fam == "count":
        return fam, args[0], _multiset(args[1])
    return fam, args  # reverse, sub, first_k, last_k, repeat: the order is the question


def _twins(task, rng, n=3):
    """The same task with its inputs reordered (and rephrased); none if order matters."""
    fam, args = task.family, task.args
    if fam not in _ORDER_FREE:
        return []
    out = []
    for _ in range(n):
        if fam == "add":
            new = args[::-1]
        elif fam == "count":
            new = (args[0], tuple(rng.sample(args[1], len(args[1]))))
        else:
            new = (tuple(rng.sample(args[0], len(args[0]))),)
        out.append(make_task(fam, new, rng.randrange(len(tasks.SPECS[fam].templates))))
    return out


def test_task_key_is_the_task_up_to_orders_the_answer_ignores():
    rng = random.Random(6)
    sample = [tasks.sample_task(rng) for _ in range(3000)]
    for t in sample:
        for twin in _twins(t, rng):
            assert tasks.task_key(twin) == tasks.task_key(t) and twin.answer == t.answer
            assert tasks.is_heldout(twin) == tasks.is_heldout(t), (t, twin)
    # the key groups tasks exactly as _canon does, and each group has one answer
    by_key, by_canon = {}, {}
    for t in sample + [tw for t in sample[:500] for tw in _twins(t, rng)]:
        by_key.setdefault(tasks.task_key(t), set()).add(_canon(t))
        by_canon.setdefault(_canon(t), set()).add((tasks.task_key(t), t.answer))
    assert all(len(v) == 1 for v in by_key.values()) and all(len(v) == 1 for v in by_canon.values())
    # where the order is the question, reordering makes another task
    for fam, args, other in [("reverse", ((1, 7, 3),), ((3, 7, 1),)), ("sub", (8, 3), (3, 8)),
                             ("first_k", (2, ("red", "sun", "box")), (2, ("sun", "red", "box"))),
                             ("last_k", (2, ("red", "sun", "box")), (2, ("red", "box", "sun")))]:
        assert tasks.task_key(make_task(fam, args)) != tasks.task_key(make_task(fam, other))


def test_heldout_add_has_no_swapped_twin_in_training():
    # the old leak: held-out "add 3 and 5" while "add 5 and 3" was a training task
    rng = random.Random(7)
    for _ in range(300):
        t = tasks.sample_task(rng, "add", split="heldout")
        assert tasks.is_heldout(make_task("add", t.args[::-1], phrasing=2)), t


def test_eval_prompts_disjoint_from_training_data():
    evals = tasks.eval_prompts(0, 300)
    assert len(evals) == 300 and len({_canon(t) for t in evals}) == 300
    assert all(tasks.is_heldout(t) for t in evals)

    train_prompts = _corpus_prompts(tasks.pretrain_corpus(0, 1500))  # Q/A and numbered lists
    train_prompts += [p for p, _ in tasks.ift_seed(0, 600)]
    train_prompts += [q for q, _, _ in tasks.eft_seed(0, 300)]
    assert len(train_prompts) > 3000
    train_tasks = [parse_task(p) for p in train_prompts]
    assert all(t is not None for t in train_tasks)
    assert not any(tasks.is_heldout(t) for t in train_tasks)
    assert not {_canon(t) for t in evals} & {_canon(t) for t in train_tasks}
    # not only these 300: no held-out task at all is a reordering of a training task
    rng = random.Random(8)
    assert not any(tasks.is_heldout(tw) for t in train_tasks for tw in _twins(t, rng))


def _heldout_repeat_tasks():
    """Every held-out task of the smallest family (the sampler's words and k = 2..5)."""
    return {(w, k) for w in tasks.LEXICON for k in range(2, 6)
            if tasks.is_heldout(make_task("repeat", (w, k)))}


@pytest.mark.parametrize("seed,n", [(0, 300), (1, 100), (2, 24), (5, 1000)])
def test_eval_prompts_distinct_tasks_balanced_families(seed, n):
    evals = tasks.eval_prompts(seed, n)
    assert len(evals) == n and len({_canon(t) for t in evals}) == n  # no task twice
    assert evals == tasks.eval_prompts(seed, n)
    counts = Counter(t.family for t in evals)
    assert set(counts) == set(FAMILIES)
    n_repeat = len(_heldout_repeat_tasks())
    assert 100 // len(FAMILIES) < n_repeat < 300 // len(FAMILIES)  # 300 prompts exhaust it
    if n // len(FAMILIES) >= n_repeat:  # repeat runs out: it gives all it has, others fill
        assert counts.pop("repeat") == n_repeat
    assert max(counts.values()) - min(counts.values()) <= 1


# -----------------------------------------------------------------------------
# the data sets

def test_corpus_mixture_and_format():
    docs = tasks.pretrain_corpus(1, 2000)
    assert len(docs) == 2000 and all(d.strip() for d in docs)
    assert not any("<|" in d or "<s>" in d or "</s>" in d for d in docs)
    assert any(d.startswith("Q: ") for d in docs) and any(d.startswith("User: ") for d in docs)
    assert any(re.search(r"^3\. ", d, re.M) for d in docs)
    assert any(d.count("\nA: ") >= 3 for d in docs)  # several Q/A pairs in one document
    hist = Counter()
    for d in docs:
        for q, a in re.findall(r"^(?:Q|Question|User): (.*)\n(?:A|Answer|Assistant): (.*)$", d, re.M):
            hist[grade(parse_task(q), a).points] += 1
    n = sum(hist.values())
    assert n > 2000
    assert 0.35 <= hist[5] / n <= 0.47  # gold share of the "web"
    assert all(hist[p] / n >= 0.03 for p in range(5))  # every mistake level is present


def test_ift_seed():
    pairs = tasks.ift_seed(2, 240)
    assert len(pairs) == 240 and len({p for p, _ in pairs}) == 240
    fams = Counter()
    for prompt, response in pairs:
        task = parse_task(prompt)
        assert grade(task, response).points == 5
        fams[task.family] += 1
    assert set(fams.values()) == {20}


def _split_filled(template, filled):
    """Recover (instruction, response) from a filled judge prompt."""
    head, rest = template.split("{instruction}")
    middle, tail = rest.split("{response}")
    assert filled.startswith(head) and filled.endswith(tail)
    body = filled[len(head):len(filled) - len(tail)]
    instruction, response = body.split(middle, 1)
    return instruction, response


@pytest.mark.parametrize("n", [300, 301, 5])
def test_eft_seed_balanced_and_consistent_with_the_oracle(n):
    data = tasks.eft_seed(3, n)
    assert len(data) == n
    scores = Counter()
    for instruction, response, target in data:
        last = target.splitlines()[-1]
        m = re.fullmatch(r"Score: ([0-5])", last)
        assert m, last
        k = int(m.group(1))
        scores[k] += 1
        g = grade(parse_task(instruction), response)
        assert g.points == k
        assert target == tasks.judge_target(parse_task(instruction), g)
    # the scores follow tasks.EFT_SCORES in turn (0 counts twice: wrong-kind answers)
    want = Counter(tasks.EFT_SCORES[i % len(tasks.EFT_SCORES)] for i in range(n))
    assert scores == want
    if n >= 7:
        assert set(scores) == set(range(6)) and scores[0] >= 2 * min(scores.values()) - 1


def test_eft_groups_show_one_question_with_responses_of_different_scores():
    """--eft_group 4: questions come in groups whose responses differ in score (so the
    findings cannot be guessed from the question alone); the target is the oracle's judgment
    of that very response; the scores stay balanced as in eft_seed (each of 1..5 about n / 7)."""
    n = 700
    data = tasks.eft_seed(3, n, group=4)
    assert len(data) == n
    by_question, scores = {}, Counter()
    for instruction, response, target in data:
        task = parse_task(instruction)
        assert target == tasks.judge_target(task, grade(task, response))
        k = grade(task, response).points
        by_question.setdefault(instruction, []).append((response, k))
        scores[k] += 1
    sizes = Counter(len(v) for v in by_question.values())
    assert sizes[4] >= 0.9 * len(by_question), sizes
    for rows in by_question.values():
        assert len({r for r, _ in rows}) == len(rows)  # distinct responses
        if len(rows) >= 2:
            assert len({k for _, k in rows}) >= 2, rows  # at least two scores: the response matters
    for k in range(1, 6):
        assert abs(scores[k] - n / 7) <= 0.25 * n / 7, scores
    assert scores[0] >= 1.5 * n / 7, scores


def test_eft_groups_take_the_policys_own_samples_of_a_question_into_its_group():
    """The pool's responses to a question join that question's group when they have a score
    the group needs, the rest of the group is targeted corruptions; with reference=True one
    reference serves the whole group and every target is graded against it."""
    rng = random.Random(0)
    pool_tasks = [tasks.sample_task(rng, split="train") for _ in range(40)]
    pool = [(t, tasks.corrupt(t, rng, "partly_wrong")) for t in pool_tasks for _ in range(2)]
    data = tasks.eft_seed(5, 200, pool=pool, pool_share=1.0, group=4)
    own = {(t.prompt, r) for t, r in pool}
    groups = {}
    for q, r, _ in data:
        groups.setdefault(q, []).append(r)
    pooled = [q for q, rs in groups.items() if any((q, r) in own for r in rs)]
    assert len(pooled) >= 15
    for q in pooled:
        assert sum((q, r) in own for r in groups[q]) <= 2 and len(groups[q]) >= 3
    refs = {}
    for prompt, response, target, reference in tasks.eft_seed(9, 140, group=4, reference=True):
        refs.setdefault(prompt, set()).add(reference)
        task = parse_task(prompt)
        assert judge.parse_score(target) == grade(tasks.with_answer(task, tasks.answer_of(task, reference)),
                                                  response).points
    assert all(len(r) == 1 for r in refs.values())


def test_eft_zeros_are_mostly_answers_of_the_wrong_kind():
    """A judge must read the question: many EFT zeros answer with another family's kind."""
    kinds = Counter()
    for _, _, target in tasks.eft_seed(5, 700):
        if target.endswith("Score: 0"):
            kinds[target.splitlines()[1]] += 1
    wrong_kind = sum(v for k, v in kinds.items() if k.startswith("relevant: no "))
    assert wrong_kind >= 0.5 * sum(kinds.values()), kinds


def test_judge_target_format():
    """What the question asks for, then each criterion's finding before its point, then the score."""
    task = make_task("add", (1, 2))
    g = grade(task, "The sum is 4.")
    assert tasks.judge_target(task, g).splitlines() == [
        "Asked for: one number.", "relevant: gives one number: +1", "substantial: in the right range: +1",
        "basic elements: off by at most one: +1", "correct: off by one: +0",
        "impeccable: earlier point missing: +0", "Score: 3"]
    sort = make_task("sort_asc", ((5, 2, 9, 1),))
    assert tasks.judge_target(sort, grade(sort, "The largest is 9.")).splitlines()[:2] == [
        "Asked for: a list of 4 numbers.", "relevant: no list of numbers: +0"]


def test_judge_prompt_fills_and_keeps_braces():
    tpl = judge.load_judge_template()
    assert "{instruction}" in tpl and "{response}" in tpl
    assert 40 <= len(tpl.split()) <= 95  # compact: every judgment pays for its length
    for name in CRITERIA:
        assert name in tpl
    assert "Score: <points>" in tpl
    instr = "What is {response} plus {0}?"
    resp = "{instruction} {} {response} }{"
    filled = judge.fill(tpl, instr, resp)
    assert "{instruction}" not in filled.replace(resp, "")
    assert filled.count(instr) == 1 and filled.count(resp) == 1
    assert _split_filled(tpl, filled) == (instr, resp)
    assert judge.fill("Q={instruction} R={response}", "a", "b") == "Q=a R=b"


def test_load_judge_template_checks_placeholders(tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Rate this: {instruction}\n")
    with pytest.raises(ValueError):
        judge.load_judge_template(str(bad))


def test_eft_eval_set():
    data = tasks.eft_eval_set(4, 60, 4)
    assert len(data) == 60
    assert len({_canon(task) for task, _, _ in data}) == 60  # distinct tasks, not just prompts
    for task, responses, points in data:
        assert tasks.is_heldout(task)
        assert len(responses) == 4 and len(set(responses)) == 4
        assert points == [grade(task, r).points for r in responses]
        assert len(set(points)) >= 3  # a spread of quality levels to rank
    big = tasks.eft_eval_set(4, 5, 8)  # more responses than score levels: still distinct texts
    assert all(len(set(r)) == 8 for _, r, _ in big)


def test_heldout_split_is_the_same_in_every_process():
    # Python's hash() is salted per process; the split must not depend on it
    import os
    import subprocess
    import sys
    code = ("import random, tasks; rng = random.Random(9); "
            "print(''.join(str(int(tasks.is_heldout(tasks.sample_task(rng)))) for _ in range(300)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.add(subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True,
                                capture_output=True, text=True).stdout.strip())
    rng = random.Random(9)
    here = "".join(str(int(tasks.is_heldout(tasks.sample_task(rng)))) for _ in range(300))
    assert outs == {here} and "1" in here


def test_easy_world_draws_smaller_tasks_that_parse_back_and_default_is_restored():
    """--world_difficulty easy: lists of 2-4 items, numbers below 20; every prompt is still a
    task the world can read back; setting "default" again gives the very draws of before."""
    rng = random.Random(3)
    before = [tasks.sample_task(rng) for _ in range(50)]
    try:
        tasks.set_difficulty("easy")
        rng = random.Random(4)
        for _ in range(1000):
            t = tasks.sample_task(rng)
            assert tasks.task_key(parse_task(t.prompt)) == tasks.task_key(t)
            lists = [a for a in t.args if isinstance(a, tuple)]
            assert all(2 <= len(xs) <= 4 for xs in lists), t
            assert all(x <= 19 for a in t.args for x in (a if isinstance(a, tuple) else (a,)) if isinstance(x, int)), t
        with pytest.raises(ValueError):
            tasks.set_difficulty("hard")
    finally:
        tasks.set_difficulty("default")
    rng = random.Random(3)
    assert [tasks.sample_task(rng) for _ in range(50)] == before

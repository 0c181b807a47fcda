"""The course kit (docs/course.md): exercises marked in the real code, a grader per exercise in
tests/course (which the reference passes: they run with the rest of this suite), and the student
copy that scripts/make_student_copy.py writes. Checked here: every exercise has its region, its
grader and its section of the handout; the student copy imports, every script starts, every
grader fails there with its own exercise's NotImplementedError, and a test file without
exercises still passes there."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_student_copy as kit  # noqa: E402

MODULES = ["model", "sampling", "data", "tasks", "checkpoint", "train_utils", "judge", "sft", "reward", "ppo", "dpo",
           "self_reward", "self_reward_world", "self_reward_real", "report", "evaluate", "bench"]
SCRIPTS = ["sft.py", "reward.py", "ppo.py", "dpo.py", "self_reward.py", "evaluate.py", "bench.py",
           "scripts/policy_report.py", "scripts/make_student_copy.py"]


def marked_regions() -> dict[str, set[str]]:
    """{exercise: the files its regions are in}, over the repository's Python files."""
    found: dict[str, set[str]] = {}
    for rel in kit.repo_files(ROOT):
        if rel.endswith(".py"):
            with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
                for name, *_ in kit.regions(f.read(), rel):
                    found.setdefault(name, set()).add(rel)
    return found


@pytest.fixture(scope="module")
def regions():
    found = marked_regions()
    if not found:
        pytest.skip("no exercise regions: this is a student copy")
    return found


def test_every_exercise_has_its_region_grader_and_handout_section(regions):
    assert set(regions) == set(kit.EXERCISES), "the marked regions and scripts/make_student_copy.py's EXERCISES differ"
    with open(os.path.join(ROOT, "docs", "course.md"), encoding="utf-8") as f:
        handout = f.read()
    for name, ex in kit.EXERCISES.items():
        assert regions[name] == {ex.where.split(":")[0]}, f"{name}: marked in {regions[name]}, EXERCISES says {ex.where}"
        assert os.path.isfile(os.path.join(ROOT, "tests", "course", f"test_{name}.py")), f"{name}: no grader"
        assert kit.grader(name) in handout, f"docs/course.md does not give the grader command of {name}"
        assert re.search(rf"`{name}`.*\b{ex.points} points", handout), f"docs/course.md: {name} worth {ex.points} points"
    assert sum(ex.points for ex in kit.EXERCISES.values()) == 100
    graders = {f[5:-3] for f in os.listdir(os.path.join(ROOT, "tests", "course")) if f.startswith("test_")}
    assert graders == set(kit.EXERCISES), "every grader in tests/course belongs to an exercise"


def test_student_copy_imports_starts_and_fails_only_at_the_exercises(regions, tmp_path):
    out = tmp_path / "student"
    cuts = kit.make_student_copy(str(out), quiet=True)
    assert set(cuts) == set(kit.EXERCISES)
    for rel in kit.repo_files(ROOT):
        if rel.endswith(".py"):
            lines = (out / rel).read_text(encoding="utf-8").splitlines()
            assert not any(kit.BEGIN.match(x) or kit.END.match(x) for x in lines), f"{rel}: a marker was left"
    ppo_py = (out / "ppo.py").read_text(encoding="utf-8")
    assert "torch.rsqrt(var + eps)" not in ppo_py and "for t in reversed(range(N))" not in ppo_py, "a solution was left"
    assert ppo_py.count("raise NotImplementedError(") == 9  # masked_stats 2, kl_reward, gae, rloo, grpo, policy, value, entropy
    assert not (out / ".git").exists(), "the copy must not carry the git history (it holds the solutions)"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")

    # every module imports and every script answers --help, in one process
    starts = f"""
import contextlib, importlib, io, json, runpy, sys
for m in {MODULES!r}:
    importlib.import_module(m)
codes = {{}}
for s in {SCRIPTS!r}:
    sys.argv = [s, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(s, run_name="__main__")
        codes[s] = "no exit"
    except SystemExit as e:
        codes[s] = e.code
print(json.dumps(codes))
"""
    r = subprocess.run([sys.executable, "-c", starts], cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the student copy does not import:\n{r.stderr[-3000:]}"
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(c in (0, None) for c in codes.values()), f"--help of the student copy's scripts: {codes}"

    # the graders fail, each on its own exercise; a test file without exercises passes
    report = tmp_path / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        "tests/course", "tests/test_data.py"], cwd=out, env=env, capture_output=True, text=True,
                       timeout=300)
    outcomes: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname").split(".")[-1]
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        state = "skipped" if case.find("skipped") is not None else "passed" if failure is None else "failed"
        text = "" if failure is None else (failure.get("message", "") + (failure.text or ""))
        outcomes.setdefault(module, []).append((state, text))
    assert {m[5:] for m in outcomes if m != "test_data"} == set(kit.EXERCISES), r.stdout[-3000:]
    for name in kit.EXERCISES:
        for state, text in outcomes[f"test_{name}"]:
            assert state == "failed" and "NotImplementedError" in text and f"exercise {name} (" in text, (
                f"tests/course/test_{name}.py in the student copy must fail with the {name} exercise's "
                f"NotImplementedError, got {state}: {text[-800:]}")
    data = outcomes["test_data"]
    assert all(state in ("passed", "skipped") for state, _ in data) and any(s == "passed" for s, _ in data), \
        f"tests/test_data.py (no exercises) must pass in the student copy:\n{r.stdout[-3000:]}"


def test_markers_are_checked(tmp_path):
    """A region left open, an unknown name or a stray end marker is an error naming the line."""
    with pytest.raises(SystemExit, match=r"x.py:2: exercise 'gae' is never closed"):
        kit.regions("def f():\n    # --- exercise: gae ---\n    return 1\n", "x.py")
    with pytest.raises(SystemExit, match=r"x.py:2: unknown exercise 'nope'"):
        kit.regions("def f():\n    # --- exercise: nope ---\n", "x.py")
    with pytest.raises(SystemExit, match=r"x.py:1: '# --- end exercise ---' without"):
        kit.regions("# --- end exercise ---\n", "x.py")
    text, names = kit.cut("def f(x):\n    \"\"\"doc\"\"\"\n    # --- exercise: gae ---\n    return x\n"
                          "    # --- end exercise ---\n", "x.py")
    assert names == ["gae"]
    namespace = {}
    exec(text, namespace)
    with pytest.raises(NotImplementedError, match="exercise gae .*tests/course/test_gae.py"):
        namespace["f"](1)
    assert namespace["f"].__doc__ == "doc"


def test_readme_reading_order_names_functions_that_exist():
    """The README's reading order points at objectives by file and name: each name (after its
    file, `a.py` `f` `g`) must be a function or class defined at the top level of that file,
    so a rename breaks this test instead of leaving the guide pointing at nothing."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    names, current = [], None
    for token in re.findall(r"`([^`]+)`", section):
        if token.endswith(".py"):
            current = token
        else:
            names.append((current, token))
    assert len(names) >= 15
    for path, name in names:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            source = f.read()
        assert re.search(rf"^(def|class) {re.escape(name)}\b", source, re.MULTILINE), f"README: {path} has no {name}"

"""Tests for data.py: tokenizer, chat template, JSONL formats and their validation, padding."""

import json
from pathlib import Path

import pytest
import torch

import data as D
from data import (
    DataError,
    UserError,
    Example,
    Preference,
    decode_response,
    encode_chat,
    encode_prompt,
    encode_response,
    load_preference_data,
    load_sft_data,
    load_tokenizer,
    pad_batch,
    show_supervision,
    train_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXTS = [
    "Sort these numbers: 5 3 9 1. Sorted: 1 3 5 9.",
    "Reverse the word hello. Reversed: olleh.",
    "What is 12 + 30? The answer is 42.",
    "Could you uppercase this for me: cat dog. Sure: CAT DOG.",
    "Count the letter a in banana. There are 3.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


# -----------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("text", [
    "Sort these numbers: 5 3 9 1.",
    "  leading and trailing spaces  \n\ttabs and newlines\n",
    "héllo wörld — naïve café, 日本語, emoji 🙂👍, Ωμέγα",
    "0123456789 and 3.14159 and -42 and 1,000,000",
    "",
])
def test_encode_decode_round_trip(tok, text):
    """Byte-level BPE: decode(encode(text)) == text for ASCII, unicode (unseen in training),
    whitespace and digits; no unknown tokens."""
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    """Every digit is its own token, even in numbers seen often in training."""
    for number in ("12345", "42", "1000000", "30"):
        ids = tok.encode(number)
        assert len(ids) == len(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    ids = tok.encode("x=2024;")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == ["2", "0", "2", "4"]


def test_special_ids_distinct_and_named(tok):
    """BOS, EOS, PAD (and the turn marker) are distinct single tokens of the vocabulary, and
    EOS is the <|im_end|> marker the template closes replies with."""
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.user_start_id]
    assert None not in ids and len(set(ids)) == 4
    assert tok.tk.id_to_token(tok.bos_id) == D.BOS
    assert tok.tk.id_to_token(tok.eos_id) == D.END_OF_TURN
    assert tok.tk.id_to_token(tok.pad_id) == D.PAD
    assert tok.tk.id_to_token(tok.user_start_id) == D.USER_START
    assert tok.vocab_size <= 300


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    """save -> load_tokenizer (file path or model directory) gives identical ids and the same
    special ids."""
    tok.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(str(where))
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.user_start_id) == \
               (tok.bos_id, tok.eos_id, tok.pad_id, tok.user_start_id)
        assert loaded.vocab_size == tok.vocab_size
        for t in TEXTS[:5] + ["héllo 🙂 12345"]:
            assert loaded.encode(t) == tok.encode(t)
        assert encode_chat(loaded, "hi 12", "yo") == encode_chat(tok, "hi 12", "yo")


def hf_style_tokenizer_dir(tmp_path, specials, config):
    """A byte-level BPE saved like an HF model directory: tokenizer.json (with the given
    special tokens) + tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=280, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_load_hf_tokenizer_without_pad(tmp_path):
    """An HF tokenizer with no pad token (Llama-style <s> </s>) gets EOS from
    tokenizer_config.json and a pad id distinct from EOS; the chat template still works with
    plain-text markers and masks exactly the prompt."""
    path = hf_style_tokenizer_dir(tmp_path, ["<s>", "</s>"],
                                  {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None})
    tok = load_tokenizer(path)
    assert tok.tk.id_to_token(tok.eos_id) == "</s>"
    assert tok.tk.id_to_token(tok.bos_id) == "<s>"
    assert tok.pad_id is not None and tok.pad_id != tok.eos_id
    ids, mask = encode_chat(tok, "Hi", "Hello")
    p = encode_prompt(tok, "Hi")
    assert ids[: len(p)] == p and ids[-1] == tok.eos_id
    assert mask == [0] * len(p) + [1] * (len(ids) - len(p))
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello</s>")


def test_load_chatml_tokenizer_uses_im_end_as_eos(tmp_path):
    """A ChatML model (vocabulary has <|im_end|>, config EOS is another token, pad == EOS)
    stops replies at <|im_end|>, and pad is still not EOS."""
    path = hf_style_tokenizer_dir(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  {"eos_token": "<|endoftext|>", "pad_token": "<|im_end|>"})
    tok = load_tokenizer(path)
    assert tok.tk.id_to_token(tok.eos_id) == "<|im_end|>"
    assert tok.pad_id != tok.eos_id


def test_load_tokenizer_missing_file(tmp_path):
    """A directory without tokenizer.json, a path that does not exist and a tokenizer.json
    that is not one are user errors that name the path."""
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_tokenizer(str(tmp_path))


# -----------------------------------------------------------------------------
# Chat template


def test_encode_chat_masks_exactly_the_prompt(tok):
    """encode_chat = encode_prompt + response + EOS; the loss mask is 0 on exactly the
    encode_prompt tokens and 1 on the response and its EOS; the last token is EOS."""
    prompt, response = "Sort: 3 1 2", "Sorted: 1 2 3."
    ids, mask = encode_chat(tok, prompt, response)
    p = encode_prompt(tok, prompt)
    assert len(ids) == len(mask)
    assert ids[: len(p)] == p
    assert ids[len(p):] == tok.encode(response) + [tok.eos_id] == encode_response(tok, response)
    assert mask == [0] * len(p) + [1] * (len(ids) - len(p))
    assert ids[-1] == tok.eos_id
    assert ids.count(tok.eos_id) == 2  # the prompt's closed user turn + the reply's EOS
    assert ids[0] == tok.bos_id


def test_chat_template_text(tok):
    """The template is ChatML-style, exactly as documented in data.py."""
    ids, _ = encode_chat(tok, "Reverse abc", "cba")
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|endoftext|><|im_start|>user\nReverse abc<|im_end|>\n<|im_start|>assistant\ncba<|im_end|>")
    assert tok.decode(encode_prompt(tok, "Reverse abc"), skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n")


def test_decode_response_cuts_at_first_eos(tok):
    """decode_response stops at the first EOS: padding or text after it never shows."""
    r = encode_response(tok, "The answer is 42.")
    junk = tok.encode(" GARBAGE 99") + [tok.eos_id] + tok.encode(" MORE")
    assert decode_response(tok, r + junk) == "The answer is 42."
    assert decode_response(tok, torch.tensor(r + [tok.pad_id] * 3)) == "The answer is 42."
    assert decode_response(tok, tok.encode("no eos here")) == "no eos here"
    assert decode_response(tok, [tok.eos_id] + tok.encode("after")) == ""


def test_show_supervision_marks_prompt_only(tok):
    """show_supervision wraps exactly the masked prompt part in ⟦ ⟧ and leaves the supervised
    response (with its EOS) outside."""
    ids, mask = encode_chat(tok, "Uppercase cat", "CAT")
    s = show_supervision(tok, ids, mask)
    prompt_text = tok.decode(encode_prompt(tok, "Uppercase cat"), skip_special_tokens=False)
    assert s == f"⟦{prompt_text}⟧CAT<|im_end|>"
    assert s.count("⟦") == 1 and s.count("⟧") == 1
    # works on tensors too, and a fully supervised sequence has no brackets
    assert show_supervision(tok, torch.tensor(ids), torch.tensor(mask)) == s
    assert "⟦" not in show_supervision(tok, ids, [1] * len(ids))


# -----------------------------------------------------------------------------
# JSONL formats


def write(tmp_path, lines, name="data.jsonl"):
    """Write raw lines (dicts are JSON-encoded) and return the path as a string."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(l) if not isinstance(l, str) else l) + "\n" for l in lines),
                    encoding="utf-8")
    return str(path)


def test_sft_prompt_response(tmp_path):
    """{"prompt","response"} lines give Examples with stripped text; blank lines are skipped."""
    path = write(tmp_path, [{"prompt": " Hi ", "response": "Hello! "}, "", {"prompt": "a", "response": "b"}])
    assert load_sft_data(path) == [Example("Hi", "Hello!"), Example("a", "b")]


def test_sft_alpaca_with_and_without_input(tmp_path):
    """Alpaca: instruction + input joined by a blank line; no/empty input -> the instruction."""
    path = write(tmp_path, [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
    ])
    assert load_sft_data(path) == [
        Example("Translate to French.\n\ncat", "chat"),
        Example("Name a colour.", "Blue."),
        Example("Name a fruit.", "Apple."),
    ]


def test_sft_self_instruct_instances(tmp_path):
    """self-instruct: each instance is one Example with the shared instruction."""
    path = write(tmp_path, [{"id": "t0", "name": "add", "is_classification": False,
                             "instruction": "Add the numbers.",
                             "instances": [{"input": "1 2", "output": "3"},
                                           {"input": "", "output": "Give me numbers."},
                                           {"input": "4 5", "output": "9"}]}])
    assert load_sft_data(path) == [Example("Add the numbers.\n\n1 2", "3"),
                                   Example("Add the numbers.", "Give me numbers."),
                                   Example("Add the numbers.\n\n4 5", "9")]


def test_sft_chat_messages_single_and_multi_turn(tmp_path):
    """chat messages: a single user turn is the prompt as is; a multi-turn conversation
    (system included) is flattened into the prompt, and the final assistant turn is the reply."""
    path = write(tmp_path, [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Add 1 and 2"},
                      {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "Now times 4"},
                      {"role": "assistant", "content": "12"}]},
    ])
    single, multi = load_sft_data(path)
    assert single == Example("Hi", "Hello")
    assert multi.response == "12"
    assert multi.prompt == ("System: Be brief.\n\nHuman: Add 1 and 2\n\nAssistant: 3\n\n"
                            "Human: Now times 4")


def test_preference_explicit(tmp_path):
    """{"prompt","chosen","rejected"} lines give Preferences with stripped text."""
    path = write(tmp_path, [{"prompt": "Q? ", "chosen": " good", "rejected": "bad "}])
    assert load_preference_data(path) == [Preference("Q?", "good", "bad")]


def test_preference_from_ranked_lists(tmp_path):
    """A ranked list gives one pair per ranked comparison (InstructGPT's K-choose-2), ties none:
    DPO can then train on the reward model's own comparison file."""
    path = write(tmp_path, [{"prompt": "Q", "responses": ["a", "b", "c"]},
                            {"prompt": "R", "responses": ["x", "y", "z"], "scores": [1, 3, 1]}])
    got = load_preference_data(path)
    assert sorted((p.prompt, p.chosen, p.rejected) for p in got) == [
        ("Q", "a", "b"), ("Q", "a", "c"), ("Q", "b", "c"), ("R", "y", "x"), ("R", "y", "z")]


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_preference_hh_single_and_multi_turn(tmp_path):
    """HH transcripts: the shared conversation is the prompt (single turn: the human text;
    multi-turn: flattened with speaker names), the last assistant replies are chosen/rejected."""
    path = write(tmp_path, [
        {"chosen": hh("How do I bake bread?", "Mix flour and water."),
         "rejected": hh("How do I bake bread?", "No idea.")},
        {"chosen": hh("Hi", "Hello, how can I help?", "Tell me a joke", "Why did the chicken..."),
         "rejected": hh("Hi", "Hello, how can I help?", "Tell me a joke", "No.")},
    ])
    one, multi = load_preference_data(path)
    assert one == Preference("How do I bake bread?", "Mix flour and water.", "No idea.")
    assert multi == Preference("Human: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke",
                               "Why did the chicken...", "No.")


def test_preference_hh_reply_containing_human_marker(tmp_path):
    """A final reply that itself contains '\\n\\nHuman:' (or '\\n\\nAssistant:') stays whole:
    the split is at the last Assistant marker of the shared conversation."""
    chosen = hh("Write a dialogue", "Sure:\n\nHuman: hello\n\nAssistant: hi there")
    rejected = hh("Write a dialogue", "No.")
    path = write(tmp_path, [{"chosen": chosen, "rejected": rejected},
                            {"chosen": rejected, "rejected": chosen}])
    a, b = load_preference_data(path)
    assert a == Preference("Write a dialogue", "Sure:\n\nHuman: hello\n\nAssistant: hi there", "No.")
    assert b == Preference("Write a dialogue", "No.", "Sure:\n\nHuman: hello\n\nAssistant: hi there")


def test_preference_hh_replies_with_common_start(tmp_path):
    """Replies that begin with the same words are split at the Assistant marker, not at the
    end of their common prefix."""
    path = write(tmp_path, [{"chosen": hh("Help?", "I can help with that."),
                             "rejected": hh("Help?", "I can not.")}])
    assert load_preference_data(path) == [Preference("Help?", "I can help with that.", "I can not.")]


# -----------------------------------------------------------------------------
# Validation: every bad line is reported as path:lineno: what


GOOD_SFT = [{"prompt": "p", "response": "r"}, "", {"instruction": "i", "output": "o"}]  # bad on line 4
GOOD_PREF = [{"prompt": "p", "chosen": "c", "rejected": "r"}, "",
             {"chosen": hh("q", "a"), "rejected": hh("q", "b")}]

BAD_SFT = {
    "invalid JSON": ('{"prompt": "p", "response": ', "invalid JSON"),
    "not an object": ('["p", "r"]', "expected a JSON object"),
    "missing field": ({"instruction": "do it"}, "missing field 'output'"),
    "wrong type": ({"prompt": "p", "response": 3}, "'response' must be a string"),
    "empty response": ({"prompt": "p", "response": "  \n"}, "'response' is empty"),
    "unknown role": ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
                     "unknown role 'bot'"),
    "no final assistant turn": ({"messages": [{"role": "user", "content": "a"}]}, "assistant"),
    "unrecognised keys": ({"question": "q", "answer": "a"}, "unrecognised format"),
    "preference line": ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference line"),
    "bad instance": ({"instruction": "i", "instances": [{"input": "x"}]}, "missing field 'output'"),
}

BAD_PREF = {
    "invalid JSON": ("{chosen: 1}", "invalid JSON"),
    "not an object": ('"just a string"', "expected a JSON object"),
    "missing field": ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    "wrong type": ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "'chosen' must be a string"),
    "unrecognised keys": ({"prompt_text": "p", "good": "c", "bad": "r"}, "unrecognised format"),
    "HH no shared prompt": ({"chosen": hh("one question", "a"), "rejected": hh("another", "b")},
                            "do not share"),
    "HH not a transcript": ({"chosen": "plain text A", "rejected": "plain text B"}, "do not share"),
}


@pytest.mark.parametrize("kind", list(BAD_SFT))
def test_bad_sft_line_reports_path_and_line(tmp_path, kind):
    """load_sft_data raises DataError 'path:4: <what>' for a bad 4th line (after good ones)."""
    bad, what = BAD_SFT[kind]
    path = write(tmp_path, GOOD_SFT + [bad, {"prompt": "later", "response": "fine"}])
    with pytest.raises(DataError) as e:
        load_sft_data(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4:"), msg
    assert what in msg, msg


@pytest.mark.parametrize("kind", list(BAD_PREF))
def test_bad_preference_line_reports_path_and_line(tmp_path, kind):
    """load_preference_data raises DataError 'path:4: <what>' for a bad 4th line."""
    bad, what = BAD_PREF[kind]
    path = write(tmp_path, GOOD_PREF + [bad])
    with pytest.raises(DataError) as e:
        load_preference_data(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4:"), msg
    assert what in msg, msg


@pytest.mark.parametrize("loader", [load_sft_data, load_preference_data])
@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, loader, content):
    """An empty (or blank-only) file is a DataError naming the file, not an empty dataset."""
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        loader(str(path))
    assert str(e.value).startswith(f"{path}:")
    assert "no data" in str(e.value)


def test_missing_file_or_directory_is_a_data_error_naming_it(tmp_path):
    """A path that does not exist, or a directory, is a DataError naming the path."""
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_sft_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        load_preference_data(str(tmp_path))


def test_invalid_utf8_names_file_and_line(tmp_path):
    """A byte that is not UTF-8 on line 3 is a DataError 'path:3:', not a bare UnicodeDecodeError."""
    path = tmp_path / "latin1.jsonl"
    good = [json.dumps({"prompt": "p", "response": "r"}).encode()] * 2
    lines = good + ['{"prompt": "caf\u00e9", "response": "ok"}'.encode("latin-1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        load_sft_data(str(path))
    assert str(e.value).startswith(f"{path}:3: not valid UTF-8"), str(e.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    """A file saved with a UTF-8 BOM (as some editors do) reads like one without."""
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    text = "\n".join(json.dumps(r) if isinstance(r, dict) else r for r in GOOD_SFT) + "\n"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_sft_data(str(bom)) == load_sft_data(str(plain))


def test_data_error_is_a_value_error():
    """Callers that catch ValueError also catch DataError."""
    assert issubclass(DataError, ValueError)


# -----------------------------------------------------------------------------
# Real files in ../shared/data (skipped when absent)


def shared_file(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def count_lines(path):
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


@pytest.mark.parametrize("name", ["self_instruct_seed_tasks.jsonl",
                                  "self_instruct_user_oriented_instructions.jsonl"])
def test_real_self_instruct_files(name):
    """The self-instruct files load: at least one Example per line (multi-instance tasks give
    more), every prompt and response non-empty and stripped."""
    path = shared_file(name)
    n = count_lines(path)
    examples = load_sft_data(str(path))
    assert len(examples) >= n
    if name.startswith("self_instruct_seed"):
        assert n == 175
    for e in examples:
        assert e.prompt and e.response
        assert e.prompt == e.prompt.strip() and e.response == e.response.strip()


def test_real_hh_file():
    """The HH harmless-base test file gives one Preference per line (2312), with a non-empty
    prompt, and chosen != rejected for almost all pairs."""
    path = shared_file("hh_rlhf_harmless_base_test.jsonl")
    n = count_lines(path)
    assert n == 2312
    prefs = load_preference_data(str(path))
    assert len(prefs) == n
    assert all(p.prompt for p in prefs)
    assert sum(bool(p.chosen) and bool(p.rejected) for p in prefs) >= 0.99 * n
    assert sum(p.chosen != p.rejected for p in prefs) >= 0.9 * n
    assert not any(p.prompt.startswith("Human:") and "\n\nAssistant:" not in p.prompt for p in prefs)
    assert not any(p.prompt.endswith("Assistant:") for p in prefs)


# -----------------------------------------------------------------------------
# Batching


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_pad_batch_right():
    """Right padding: tokens at the start, pad after; masks mark exactly the real tokens; the
    loss mask is placed with its tokens; real tokens get positions 0..n-1."""
    seqs, losses = [[5, 6, 7], [8], [9, 10]], [[0, 1, 1], [1], [0, 1]]
    ids, attn, loss = pad_batch(seqs, pad_id=0, side="right", loss_masks=losses)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert attn.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert loss.tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 0]]
    assert ids.dtype == attn.dtype == loss.dtype == torch.long
    pos = positions(attn)
    for i, s in enumerate(seqs):
        assert pos[i, : len(s)].tolist() == list(range(len(s)))


def test_pad_batch_left():
    """Left padding: tokens at the end (every row's next token lands in the same column);
    masks mark exactly the real tokens; real tokens get positions 0..n-1 from the mask."""
    seqs, losses = [[5, 6, 7], [8], [9, 10]], [[0, 1, 1], [1], [0, 1]]
    ids, attn, loss = pad_batch(seqs, pad_id=3, side="left", loss_masks=losses)
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8], [3, 9, 10]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert loss.tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 1]]
    pos = positions(attn)
    for i, s in enumerate(seqs):
        assert pos[i, ids.shape[1] - len(s):].tolist() == list(range(len(s)))
    two = pad_batch(seqs, pad_id=3, side="left")
    assert len(two) == 2 and torch.equal(two[0], ids) and torch.equal(two[1], attn)


def test_encode_documents_prefixes_bos(tok):
    """The pretraining stream is BOS + doc for every document, concatenated."""
    docs = ["ab 12", "cd"]
    stream = D.encode_documents(tok, docs)
    assert stream.tolist() == [tok.bos_id] + tok.encode(docs[0]) + [tok.bos_id] + tok.encode(docs[1])
    assert stream.dtype == torch.long

"""Tokenizer, chat template, JSONL formats and batching: everything between text and tensors.

- `Tokenizer`: a thin wrapper over a `tokenizers` byte-level BPE (trained here or loaded from
  a tokenizer.json, e.g. an HF model directory) that knows its BOS / EOS / PAD ids.
- The chat template (one user turn, one assistant reply), ChatML-style:
      <|endoftext|><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>
  The prompt part is never trained on; the response and its closing <|im_end|> are. The
  <|im_end|> token is the end-of-sequence token the sampler stops at.
- JSONL readers for the formats users bring, normalised to `Example(prompt, response)` or
  `Preference(prompt, chosen, rejected)`, validated line by line before anything is returned.
- Batching: padding (right for training, left for generation), attention and loss masks.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass

import torch

class UserError(ValueError):
    """A mistake in what the user gave: a flag, a data file, a checkpoint. The scripts print its
    message as one line (it names the file, line or flag and what to do) instead of a
    traceback; a bug raises anything else and keeps its traceback."""


BOS, USER_START, END_OF_TURN, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, USER_START, END_OF_TURN, PAD]


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the three ids the rest of the code needs.
    bos_id starts every sequence (None if the model has no BOS), eos_id ends an assistant
    reply (the sampler stops there), pad_id fills batches. PAD is never attended to or
    trained on; it is kept distinct from EOS so no code can confuse the two."""

    def __init__(self, tk, bos_token: str | None, eos_token: str, pad_token: str | None):
        self.tk = tk
        # user text that happens to contain "<|im_end|>" stays text: special tokens enter a
        # sequence only by id, from the chat template
        tk.encode_special_tokens = True
        self.bos_id = tk.token_to_id(bos_token) if bos_token else None
        self.eos_id = tk.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary")
        self.eos_token = eos_token
        self.pad_id = tk.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None or self.pad_id == self.eos_id:
            # many HF models ship no pad token; any id that is not EOS will do, because pad
            # positions are masked everywhere (attention, losses, log-probs)
            self.pad_id = next(i for i in (self.bos_id, 0, 1) if i is not None and i != self.eos_id)
        self.user_start_id = tk.token_to_id(USER_START)
        # the chat format (see "Chat template" below); load_tokenizer sets these from a
        # model's own chat template, and a script's --system sets `system`
        self.template_bos = self.bos_id is not None  # does the template open with BOS?
        self.default_system: str | None = None  # system prompt the template adds when none is given
        self.system: str | None = None  # this run's system message (None: none given)
        self.files: dict[str, str] = {}  # tokenizer_config.json, chat_template.jinja: saved back as read

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str):
        self.tk.save(path)

    def config_files(self) -> dict[str, str]:
        """The files beside tokenizer.json that tell transformers how to use it: an HF model's
        own, unchanged; for tinyalign's tokenizer, its special tokens and its chat template
        (so AutoTokenizer.apply_chat_template renders exactly what encode_prompt does)."""
        if self.files:
            return dict(self.files)
        return {"tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": END_OF_TURN,
            "pad_token": PAD, "chat_template": TINYALIGN_CHAT_TEMPLATE}, indent=2)}


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on an iterator of strings. Digits are split one by one (as in
    Llama): multi-digit tokens make sorting and arithmetic much harder for small models."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, BOS, END_OF_TURN, PAD)


def _token_str(value):
    # tokenizer_config.json stores tokens as strings or as {"content": ...}
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer.json, or the tokenizer of a model directory (tinyalign's or HF's).
    For HF directories the special tokens come from tokenizer_config.json; the end of an
    assistant reply is <|im_end|> when the vocabulary has it (ChatML models), else the
    model's EOS token."""
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise UserError(f"{file}: no tokenizer.json (tinyalign reads only the fast-tokenizer format)")
    try:
        tk = HFTokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        raise UserError(f"{file}: not a readable tokenizer.json ({e})") from None
    if tk.token_to_id(BOS) is not None and tk.token_to_id(PAD) is not None and tk.token_to_id(END_OF_TURN) is not None:
        return Tokenizer(tk, BOS, END_OF_TURN, PAD)  # one of ours
    conf = {}
    conf_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(conf_path):
        try:
            with open(conf_path, encoding="utf-8") as f:
                conf = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{conf_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    bos, eos, pad = (_token_str(conf.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    if tk.token_to_id(END_OF_TURN) is not None:
        eos = END_OF_TURN
    if eos is None:
        raise UserError(f"{directory}: cannot tell the EOS token (no tokenizer_config.json eos_token)")
    tok = Tokenizer(tk, bos, eos, pad)
    files = {name: open(os.path.join(directory, name), encoding="utf-8").read()
             for name in ("tokenizer_config.json", "chat_template.jinja")
             if os.path.exists(os.path.join(directory, name))}
    tok.files = files
    template = files.get("chat_template.jinja") or conf.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        tok.template_bos, tok.default_system = read_chat_template(template, directory)
    return tok


def read_chat_template(template: str, where: str) -> tuple[bool, str | None]:
    """What a model's own (Jinja) chat template does, for the one-user-turn conversations
    tinyalign renders: (does it open with the BOS token?, the system prompt it inserts when
    the conversation has none, or None). tinyalign renders ChatML itself instead of running
    Jinja (not a dependency), so a template of another family is refused, never guessed."""
    if USER_START not in template or END_OF_TURN not in template:
        raise UserError(f"{where}: the chat template is not ChatML (<|im_start|>role ... <|im_end|>); "
                        "tinyalign renders ChatML chat models (SmolLM2, Qwen2) and base models")
    # a default system turn is a literal '<|im_start|>system\n...<|im_end|>' in the template
    m = re.search(r"<\|im_start\|>system\s*\n(.*?)<\|im_end\|>", template, re.DOTALL)
    default = m.group(1) if m and "{{" not in m.group(1) and "{%" not in m.group(1) else None
    return "bos_token" in template, default


# -----------------------------------------------------------------------------
# Chat template


def _marker(tok: Tokenizer, text: str) -> list[int]:
    # a ChatML marker is one special token when the vocabulary has it, plain text otherwise
    i = tok.tk.token_to_id(text)
    return [i] if i is not None else tok.encode(text)


# tinyalign's own chat template in Jinja, saved with its checkpoints so that transformers'
# apply_chat_template renders what encode_prompt / encode_chat do (tested).
TINYALIGN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt part of the chat template, up to and including the assistant header: what
    the model is conditioned on when it answers. The one template function of the project.

    ChatML, rendered as the model's own template renders one user turn:
        [BOS] [<|im_start|>system\n{system}<|im_end|>\n] <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
    BOS only where the template puts one (tinyalign's does; SmolLM2's does not: its BOS IS
    <|im_start|>). The system turn carries --system, or else the template's default system
    prompt if it has one (SmolLM2's inserts "You are a helpful AI assistant named SmolLM...").
    Markers enter by id; text is encoded one piece per turn (special tokens split the text
    anyway, so this equals encoding the whole rendered string)."""
    ids = [tok.bos_id] if tok.template_bos and tok.bos_id is not None else []
    system = tok.system if tok.system is not None else tok.default_system
    if system is not None:
        ids += _marker(tok, USER_START) + tok.encode("system\n" + system)
        ids += _marker(tok, END_OF_TURN) + tok.encode("\n")
    ids += _marker(tok, USER_START) + tok.encode("user\n" + prompt)
    ids += _marker(tok, END_OF_TURN) + tok.encode("\n")
    ids += _marker(tok, USER_START) + tok.encode("assistant\n")
    return ids


def encode_response(tok: Tokenizer, response: str) -> list[int]:
    """The supervised part: the reply and the EOS that closes it."""
    return tok.encode(response) + [tok.eos_id]


def encode_chat(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of one exchange and its loss mask (1 = supervised: response tokens + EOS).
    Prompt and response are encoded separately, so the boundary is exact."""
    p, r = encode_prompt(tok, prompt), encode_response(tok, response)
    return p + r, [0] * len(p) + [1] * len(r)


def decode_response(tok: Tokenizer, ids) -> str:
    """Text of sampled response tokens, cut at the first EOS."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    return tok.decode(ids).strip()


def show_supervision(tok: Tokenizer, ids, loss_mask) -> str:
    """A teaching aid: the decoded sequence with the unsupervised (masked) spans in ⟦ ⟧."""
    out, span, span_mask = [], [], None
    for i, m in zip(list(ids), list(loss_mask)):
        m = int(m)
        if span and m != span_mask:
            text = tok.decode(span, skip_special_tokens=False)
            out.append(text if span_mask else f"⟦{text}⟧")
            span = []
        span.append(int(i))
        span_mask = m
    if span:
        text = tok.decode(span, skip_special_tokens=False)
        out.append(text if span_mask else f"⟦{text}⟧")
    return "".join(out)


def encode_documents(tok: Tokenizer, docs) -> torch.Tensor:
    """Pretraining stream: every document preceded by BOS, all concatenated. (N,) long."""
    ids = []
    for d in docs:
        if tok.bos_id is not None:
            ids.append(tok.bos_id)
        ids.extend(tok.encode(d))
    return torch.tensor(ids, dtype=torch.long)


# -----------------------------------------------------------------------------
# JSONL formats


@dataclass
class Example:
    prompt: str
    response: str


@dataclass
class Preference:
    prompt: str
    chosen: str
    rejected: str


class DataError(UserError):
    """A malformed input line; the message starts with 'file:line:'."""


SFT_FORMATS = """accepted formats (one JSON object per line):
  {"prompt": str, "response": str}
  {"instruction": str, "input": str (optional), "output": str}           (Alpaca)
  {"instruction": str, "instances": [{"input": str, "output": str}, ...]} (self-instruct)
  {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}   (chat)"""

PREFERENCE_FORMATS = """accepted formats (one JSON object per line):
  {"prompt": str, "chosen": str, "rejected": str}
  {"chosen": str, "rejected": str}   (Anthropic HH transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...")"""


def read_jsonl(path: str):
    """[(line_number, object)] for the non-blank lines of a UTF-8 JSONL file (a leading
    byte-order mark is allowed)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give the path of a .jsonl file")
    rows = []
    with open(path, "rb") as f:  # bytes, so that a bad byte can be reported with its line
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise DataError(f"{path}: no data lines")
    return rows


def _text(obj, key, where, allow_empty=False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _join(instruction: str, inp: str) -> str:
    return instruction.strip() + ("\n\n" + inp.strip() if inp.strip() else "")


def _flatten_turns(turns, where) -> tuple[str, str]:
    """[(role, text)] ending with an assistant turn -> (prompt, response). Our template has one
    user turn, so earlier turns of a conversation become part of the prompt's text."""
    if not turns or turns[-1][0] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    *context, (_, response) = turns
    if not any(role == "user" for role, _ in context):
        raise DataError(f"{where}: the conversation has no user turn")
    if len(context) == 1:
        prompt = context[0][1]
    else:
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        prompt = "\n\n".join(f"{names[role]}: {text.strip()}" for role, text in context)
    if not response.strip():
        raise DataError(f"{where}: the assistant reply is empty")
    return prompt.strip(), response.strip()


def _sft_examples(obj, where) -> list[Example]:
    if "chosen" in obj or "rejected" in obj:
        raise DataError(f"{where}: this is a preference line (chosen/rejected); SFT needs demonstrations.\n{SFT_FORMATS}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object")
            role = _text(m, "role", f"{where}: messages[{i}]")
            if role not in ("user", "assistant", "system"):
                raise DataError(f"{where}: messages[{i}] has unknown role {role!r}")
            turns.append((role, _text(m, "content", f"{where}: messages[{i}]")))
        return [Example(*_flatten_turns(turns, where))]
    if "instances" in obj:
        instruction = _text(obj, "instruction", where)
        inst = obj["instances"]
        if not isinstance(inst, list) or not inst:
            raise DataError(f"{where}: 'instances' must be a non-empty list")
        out = []
        for i, x in enumerate(inst):
            w = f"{where}: instances[{i}]"
            if not isinstance(x, dict):
                raise DataError(f"{w} must be an object")
            inp = _text(x, "input", w, allow_empty=True) if "input" in x else ""
            out.append(Example(_join(instruction, inp), _text(x, "output", w).strip()))
        return out
    if "instruction" in obj:
        inp = _text(obj, "input", where, allow_empty=True) if "input" in obj else ""
        return [Example(_join(_text(obj, "instruction", where), inp), _text(obj, "output", where).strip())]
    if "prompt" in obj and "response" in obj:
        return [Example(_text(obj, "prompt", where).strip(), _text(obj, "response", where).strip())]
    raise DataError(f"{where}: unrecognised format (keys {sorted(obj)})\n{SFT_FORMATS}")


HH_USER, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_turns(transcript: str, where):
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> [("user", "a"), ("assistant", "b"), ...]."""
    turns, rest = [], transcript
    if not rest.startswith(HH_USER):
        raise DataError(f"{where}: an HH transcript must start with '\\n\\nHuman:'")
    while rest:
        role = "user" if rest.startswith(HH_USER) else "assistant"
        rest = rest[len(HH_USER if role == "user" else HH_ASSISTANT):]
        cut = [i for i in (rest.find(HH_USER), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(cut) if cut else len(rest)
        turns.append((role, rest[:end].strip()))
        rest = rest[end:]
    return turns


def _preference(obj, where) -> Preference:
    # an empty reply is a valid preference (in HH, saying nothing is sometimes the better
    # answer); a missing or non-string one is not
    if "prompt" in obj:
        return Preference(_text(obj, "prompt", where).strip(), _text(obj, "chosen", where, True).strip(),
                          _text(obj, "rejected", where, True).strip())
    if "chosen" in obj and "rejected" in obj:
        chosen, rejected = _text(obj, "chosen", where), _text(obj, "rejected", where)
        # the two transcripts share everything up to the final "Assistant:"; a reply may itself
        # contain "Human:" or "Assistant:", so the split is the last marker inside the shared part
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(HH_ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: chosen and rejected do not share a conversation ending in '\\n\\nAssistant:'")
        turns = _hh_turns(chosen[:cut], where)
        if turns[-1][0] != "user":
            raise DataError(f"{where}: the shared conversation must end with a Human turn")
        prompt, _ = _flatten_turns(turns + [("assistant", "-")], where)
        c, r = chosen[cut + len(HH_ASSISTANT):].strip(), rejected[cut + len(HH_ASSISTANT):].strip()
        return Preference(prompt, c, r)
    raise DataError(f"{where}: unrecognised format (keys {sorted(obj)})\n{PREFERENCE_FORMATS}")


def load_sft_data(path: str) -> list[Example]:
    """Demonstrations from a JSONL file in any SFT format. Every line is validated before
    anything is returned: a bad line raises DataError('file:line: what is wrong')."""
    out = []
    for n, obj in read_jsonl(path):
        out.extend(_sft_examples(obj, f"{path}:{n}"))
    return out


def load_preference_data(path: str) -> list[Preference]:
    """(prompt, chosen, rejected) triples from a JSONL file; validated like load_sft_data.
    A file of ranked lists (InstructGPT's comparisons) gives one triple per ranked pair."""
    rows = read_jsonl(path)
    if "responses" in rows[0][1]:
        comps = [ranked_comparison(obj, f"{path}:{n}") for n, obj in rows]
        return [Preference(c.prompt, c.responses[i], c.responses[j]) for c in comps for i, j in c.pairs]
    return [_preference(obj, f"{path}:{n}") for n, obj in rows]


@dataclass
class Comparison:
    """One prompt's ranked responses. pairs: (better, worse) indices into responses, one per
    comparison; scores: the values the ranking came from (oracle points), when there are any."""
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]
    scores: list[float] | None = None


def from_scores(prompt: str, responses: list[str], scores: list[float]) -> Comparison:
    """Every pair with different scores is a comparison, the higher score preferred; ties give none."""
    pairs = [(i, j) for i in range(len(responses)) for j in range(len(responses)) if scores[i] > scores[j]]
    return Comparison(prompt, list(responses), pairs, list(scores))


def ranked_comparison(obj: dict, where: str) -> Comparison:
    """A ranked-list line: {"prompt", "responses": [best..worst]} or with "scores" (ties allowed)."""
    prompt, responses = obj.get("prompt"), obj.get("responses")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: 'responses' must be a list of at least 2 strings")
    if len(set(r.strip() for r in responses)) < len(responses):
        raise DataError(f"{where}: 'responses' holds the same text twice; a response cannot be ranked against itself")
    scores = obj.get("scores")
    if scores is None:
        scores = list(range(len(responses), 0, -1))  # best first
    elif (not isinstance(scores, list) or len(scores) != len(responses)
          or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
        raise DataError(f"{where}: 'scores' must be a list of {len(responses)} finite numbers, one per response")
    return from_scores(prompt.strip(), [r.strip() for r in responses], scores)


def load_comparisons(path: str) -> list[Comparison]:
    """Comparisons from a JSONL file, validated line by line before anything is returned:
    ranked lists (every line has "responses"), or any preference format of data.py, whose
    pairs are grouped by prompt (a prompt's pairs are one batch element)."""
    rows = read_jsonl(path)
    if "responses" in rows[0][1]:
        return [ranked_comparison(obj, f"{path}:{n}") for n, obj in rows]
    groups: dict[str, Comparison] = {}
    same = 0
    for p in load_preference_data(path):
        if p.chosen == p.rejected:
            same += 1  # no information: the two sides are the same text
            continue
        g = groups.setdefault(p.prompt, Comparison(p.prompt, [], []))
        for text in (p.chosen, p.rejected):
            if text not in g.responses:
                g.responses.append(text)
        g.pairs.append((g.responses.index(p.chosen), g.responses.index(p.rejected)))
    if same:
        print(f"{path}: skipped {same} pairs whose chosen and rejected are the same text")
    return list(groups.values())


def comparison_rows(comps: list[Comparison]) -> list[dict]:
    """Scored comparisons (the world's) in the JSONL form that load_comparisons reads back."""
    return [{"prompt": c.prompt, "responses": c.responses, "scores": c.scores} for c in comps]


def read_json(path: str) -> dict:
    """A JSON file that the user gave us (config.json, ...), with errors that name it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise UserError(f"{path}: cannot be read as a JSON file ({e})") from None


def write_json(path: str, obj):
    """Write one JSON object atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)  # strict JSON: a metric with no data is null, never NaN
    os.replace(tmp, path)


def write_jsonl(path: str, rows):
    """Write dicts as JSONL atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Batching


def epoch_batch(n: int, batch_size: int, seed: int, i: int) -> list[int]:
    """Indices of the i-th batch when n items are shuffled anew each epoch (a fixed order per
    (seed, epoch)) and cut into n // batch_size batches. A pure function of i, so a resumed
    run sees exactly the batches it would have seen."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(i, per_epoch)
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order[j * batch_size : (j + 1) * batch_size]


def stream_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random windows of a token stream (nanoGPT-style). x, y: (B, seq_len)."""
    starts = torch.randint(len(stream) - seq_len - 1, (batch_size,), generator=gen)
    x = torch.stack([stream[s : s + seq_len] for s in starts])
    y = torch.stack([stream[s + 1 : s + 1 + seq_len] for s in starts])
    return x, y


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right", loss_masks=None):
    """Pad token lists to one length.
    Returns input_ids (B, T), attention_mask (B, T) and, if loss_masks are given, loss_mask
    (B, T). side='right' for training (plain causal attention stays correct), 'left' for
    generation and for scoring prompt+response pairs in one aligned batch."""
    assert side in ("left", "right")
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        attn[i, sl] = 1
        if loss_masks is not None:
            loss[i, sl] = torch.tensor(loss_masks[i], dtype=torch.long)
    if loss_masks is None:
        return ids, attn
    return ids, attn, loss

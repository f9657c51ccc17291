#!/usr/bin/env python3
"""llama.cpp's side of the GGUF export checks: what llama.cpp (through llama-cpp-python) does
with a GGUF file, for the Rust tests to compare with our own loader on the same file.

    python scripts/llama_cpp_greedy.py MODEL.gguf < request.json > answer.json

request: {"prompts": [{"text": "...", "ids": [1, 2, 3]}], "max_tokens": 8, "threads": 2}
answer:  {"llama_cpp": "0.3.36", "metadata": {...}, "results": [
            {"tokens": [...],        # llama.cpp's tokenization of "text" (no BOS, specials parsed)
             "greedy": [...],        # greedy continuation of "ids" (our tokenization), max_tokens
             "first_logits": [...]}  # the logits after "ids", before any generated token
         ]}
Greedy runs to max_tokens without stopping at EOS, as the Rust side does; ties go to the lowest
id (numpy's argmax), as ours.
"""
import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    path = sys.argv[1]
    request = json.load(sys.stdin)
    threads = int(request.get("threads", 2))
    longest = max(len(p["ids"]) for p in request["prompts"]) + request["max_tokens"] + 8
    model = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(64, longest),
        n_batch=max(64, longest),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    results = []
    for prompt in request["prompts"]:
        tokens = model.tokenize(prompt["text"].encode(), add_bos=False, special=True)
        model.reset()
        model.eval(prompt["ids"])
        first = np.array(model.scores[model.n_tokens - 1], dtype=np.float32)
        logits = first
        greedy = []
        for _ in range(request["max_tokens"]):
            token = int(np.argmax(logits))
            greedy.append(token)
            model.eval([token])
            logits = np.array(model.scores[model.n_tokens - 1], dtype=np.float32)
        results.append(
            {
                "tokens": tokens,
                "greedy": greedy,
                "first_logits": [float(x) for x in first],
            }
        )
    metadata = {k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.ggml.")}
    json.dump({"llama_cpp": llama_cpp.__version__, "metadata": metadata, "results": results},
              sys.stdout)


if __name__ == "__main__":
    main()

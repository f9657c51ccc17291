#!/usr/bin/env python3
"""Tiny random HF checkpoints and the logits HF transformers (PyTorch, CPU, float32, eager
attention) gives for them: parity fixtures for medcoder's llama / qwen2 / qwen3 / gemma3 model
files.

For each family it writes OUT/<name>/ with
  config.json, generation_config.json, model.safetensors   (model.save_pretrained, float32)
  reference.json                                            (inputs and logits, see below)

reference.json:
  inputs: two fixed id lists (10 and 12 tokens; 12 > 2 * the gemma3 sliding window), each with
    last_logits        the logits of the last position, all vocab ids
    first8_logits      the logits of every position for vocab ids 0..7 ([position][id])
    argmax             the argmax id of every position
  all at 5 decimals; plus the family's notable config facts and the torch / transformers
  versions.

The weights are random (torch.manual_seed(0), every matrix and bias normal with std 0.2,
RMSNorm weights 1 + 0.1 * randn; Gemma3 stores its norm weights as w with (1 + w) applied, so
there they are 0.1 * randn) so that logits are far from uniform and every tensor matters.

Run with .venv-reference (scripts/reference/setup-venv):
    .venv-reference/bin/python scripts/reference/tiny_models.py --out crates/models/tests/fixtures/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys

import torch
import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

DECIMALS = 5
MAX_FOLDER_BYTES = 150 * 1024
INPUTS = [
    [1, 17, 42, 5, 90, 63, 8, 77, 23, 54],
    [3, 88, 14, 60, 27, 91, 45, 2, 70, 36, 11, 95],
]

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]")


def dump_json(obj, f) -> None:
    """Sorted keys, one key per line, lists of numbers on one line. (JSON strings cannot hold a
    raw newline, so only the lists the indenting broke up are joined.)"""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    text = NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    f.write(text + "\n")


def families():
    """(folder, model class, config, what the fixture exercises)."""
    yield (
        "llama",
        LlamaForCausalLM,
        LlamaConfig(**COMMON, tie_word_embeddings=False, hidden_act="silu"),
        "Llama: GQA 4 query / 2 kv heads, head_dim 8, untied lm_head, plain RoPE",
    )
    yield (
        "llama-rope-llama3",
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            hidden_act="silu",
            # head_dim 8 at theta 1e4: wavelengths 6.3, 19.9, 62.8, 199 positions; with
            # original 32 / low 1 / high 4 the first frequency is kept, the second smoothed and
            # the last two divided by the factor: all three branches of llama3 scaling.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "Llama with rope_scaling llama3 (factor 8, low 1, high 4, original 32): all three "
        "frequency bands",
    )
    yield (
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(**COMMON, tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False),
        "Qwen2: q/k/v projections with bias, o without, untied lm_head",
    )
    yield (
        "qwen3",
        Qwen3ForCausalLM,
        Qwen3Config(
            **COMMON,
            head_dim=16,
            tie_word_embeddings=True,
            hidden_act="silu",
            attention_bias=False,
            use_sliding_window=False,
        ),
        "Qwen3: q_norm/k_norm per head, head_dim 16 != hidden 32 / 4 heads, tied embeddings",
    )
    gemma = dict(COMMON)
    gemma.update(rope_theta=1_000_000.0)
    yield (
        "gemma3",
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **gemma,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=4,
            # Layer i is global when (i + 1) % pattern == 0: layer 0 sliding, layer 1 full.
            sliding_window_pattern=2,
            rope_local_base_freq=10000.0,
            tie_word_embeddings=True,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            attention_bias=False,
        ),
        "Gemma3 text: layer 0 sliding (window 4), layer 1 full, local RoPE base 1e4 and global 1e6, "
        "query_pre_attn_scalar 24 (not head_dim 16), q_norm/k_norm, (1 + w) RMSNorm, "
        "4 norms per layer, embeddings scaled by sqrt(hidden), GELU-tanh MLP, tied embeddings, "
        "no softcapping",
    )


def randomize(model: torch.nn.Module, gemma: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # RMSNorm weights: effective scale 1 + 0.1 * randn.
                noise = 0.1 * torch.randn_like(p)
                p.copy_(noise if gemma else 1.0 + noise)
            else:
                p.copy_(0.2 * torch.randn_like(p))


def r(x) -> float:
    return round(float(x), DECIMALS)


def run(model, ids: list[int]) -> dict:
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].float()
    return {
        "input_ids": ids,
        "last_logits": [r(v) for v in logits[-1].tolist()],
        "first8_logits": [[r(v) for v in row[:8].tolist()] for row in logits],
        "argmax": [int(i) for i in logits.argmax(-1).tolist()],
    }


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder that gets one sub-folder per family")
    args = ap.parse_args()
    torch.set_num_threads(2)

    for name, cls, config, exercises in families():
        torch.manual_seed(0)
        config._attn_implementation = "eager"
        model = cls(config).to(torch.float32).eval()
        randomize(model, gemma=name.startswith("gemma"))
        path = os.path.join(args.out, name)
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path, safe_serialization=True)

        outputs = [run(model, ids) for ids in INPUTS]

        # The saved checkpoint must give the same logits (tied weights, dtype, config).
        reloaded = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
        for ids, out in zip(INPUTS, outputs):
            again = run(reloaded, ids)
            assert again == out, f"{name}: reloaded checkpoint gives other logits"

        ref = {
            "family": name,
            "architecture": cls.__name__,
            "exercises": exercises,
            "config": {
                k: v
                for k, v in sorted(config.to_dict().items())
                if k
                in {
                    "head_dim",
                    "hidden_size",
                    "layer_types",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "num_key_value_heads",
                    "query_pre_attn_scalar",
                    "rope_local_base_freq",
                    "rope_scaling",
                    "rope_theta",
                    "sliding_window",
                    "tie_word_embeddings",
                    "vocab_size",
                }
            },
            "attn_implementation": "eager",
            "dtype": "float32",
            "seed": 0,
            "logit_decimals": DECIMALS,
            "inputs": outputs,
            "generator": {
                "script": "scripts/reference/tiny_models.py",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }
        with open(os.path.join(path, "reference.json"), "w", encoding="utf-8") as f:
            dump_json(ref, f)
        size = folder_bytes(path)
        assert size < MAX_FOLDER_BYTES, f"{path}: {size} bytes"
        lo = min(outputs[0]["last_logits"])
        hi = max(outputs[0]["last_logits"])
        print(f"{name}: {size} bytes, last logits in [{lo:.3f}, {hi:.3f}], "
              f"argmax {outputs[0]['argmax']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

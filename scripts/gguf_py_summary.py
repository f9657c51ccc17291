#!/usr/bin/env python3
"""A GGUF file as llama.cpp's own Python reader (gguf-py) decodes it, for the Rust export tests to
compare with our loader: the version, alignment, each tensor's type and shape, and its values
dequantized by gguf-py's numpy port of ggml's block formats (sum, sum of squares, first 8).

    python scripts/gguf_py_summary.py MODEL.gguf > summary.json
"""
import json
import sys

import gguf
import numpy as np
from gguf.quants import dequantize


def main() -> None:
    reader = gguf.GGUFReader(sys.argv[1])
    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors[t.name] = {
            "type": t.tensor_type.name,
            # gguf-py gives ggml's order (fastest dimension first); ours is the reverse.
            "shape": [int(d) for d in reversed(t.shape)],
            "aligned": (reader.data_offset + int(t.data_offset)) % reader.alignment == 0,
            "sum": float(values.sum()),
            "sum_sq": float((values * values).sum()),
            "first": [float(v) for v in values[:8]],
        }
    json.dump(
        {
            "version": int(reader.fields["GGUF.version"].parts[-1][0]),
            "alignment": int(reader.alignment),
            "tensors": tensors,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()

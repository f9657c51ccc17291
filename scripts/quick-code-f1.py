#!/usr/bin/env python3
"""Quick learning check for `medcoder train` (issue #6): generate codes for CodiEsp documents
with `medcoder generate` (base model, or base + adapter), parse the comma-separated answer and
score micro precision/recall/F1 against the gold codes. Proper evaluation is `medcoder eval`.

Usage: quick-code-f1.py --jsonl codiesp_dev.jsonl --model smollm2-135m-instruct
                        [--adapter RUN_DIR] [--limit 100] [--medcoder target/release/medcoder]
The prompt is the default template of `prepare tokens` through the model's chat template."""
import argparse, json, re, subprocess, sys, tempfile, time

CODE = re.compile(r"[A-Z][0-9][0-9A-Z](?:\.?[0-9A-Z]{1,4})?|(?=[0-9A-Z]*[0-9])[0-9A-HJ-NP-Z]{3,7}")

def normalize(code):
    code = code.strip().upper().replace(".", "")
    if len(code) < 3 or code[0].isdigit() or not code[1].isdigit():
        return code  # ICD-10-PCS (full or partial, as CodiEsp's `CT13`)
    return code[:3] + ("." + code[3:] if len(code) > 3 else "")

def parse(text):
    seen = []
    for part in re.split(r"[,;\n]", text):
        part = part.strip().upper()
        m = CODE.fullmatch(part.replace(" ", ""))
        if m:
            c = normalize(m.group(0))
            if c not in seen:
                seen.append(c)
    return seen

def main():
    a = argparse.ArgumentParser()
    a.add_argument("--jsonl", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--adapter")
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--max-tokens", type=int, default=128)
    a.add_argument("--medcoder", default="target/release/medcoder")
    a.add_argument("--text-field", default="text_en")
    a.add_argument("--save-outputs", help="write each document's raw output here (JSONL)")
    args = a.parse_args()
    docs = [json.loads(l) for l in open(args.jsonl)][: args.limit]
    tp = fp = fn = 0
    started = time.time()
    examples = []
    saved = open(args.save_outputs, "w") if args.save_outputs else None
    for i, doc in enumerate(docs):
        prompt = "Predict the medical codes for the following text: " + doc[args.text_field]
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(prompt); f.flush()
            cmd = [args.medcoder, "generate", "--model", args.model, "--chat", "--prompt-file", f.name,
                   "--max-tokens", str(args.max_tokens), "--json", "--device", "cpu"]
            if args.adapter:
                cmd += ["--adapter", args.adapter]
            out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"medcoder generate failed on {doc['id']}: {out.stderr}")
        text = json.loads(out.stdout)["text"]
        if saved:
            saved.write(json.dumps({"id": doc["id"], "output": text}) + "\n")
        predicted = set(parse(text))
        gold = {normalize(c) for c in doc["diagnoses"] + doc["procedures"]}
        tp += len(predicted & gold); fp += len(predicted - gold); fn += len(gold - predicted)
        if i < 3:
            examples.append({"id": doc["id"], "output": text[:200], "gold": sorted(gold)[:8]})
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    print(json.dumps({"model": args.model, "adapter": args.adapter, "documents": len(docs),
                      "micro_precision": round(p, 4), "micro_recall": round(r, 4), "micro_f1": round(f1, 4),
                      "tp": tp, "fp": fp, "fn": fn, "seconds": round(time.time() - started, 1),
                      "examples": examples}, indent=1))

if __name__ == "__main__":
    main()

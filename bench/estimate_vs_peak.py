"""Admission estimate against measured peak memory, on CPU.

Builds random-weight checkpoints of a few shapes with transformers (vocabulary
32000, tens of millions of parameters), runs short jobs on them with `mezod run`
and prints `mezod estimate` next to the measured peak (VmHWM) from result.json.
Texts are long enough that every sequence is `max_length` tokens, the length
the estimator assumes.

    .venv/bin/python bench/estimate_vs_peak.py [--only TEXT] [path/to/mezod]

`--only bf16` runs only the jobs whose name contains "bf16".  About 11 minutes
for everything on 2 CPU cores (bf16 matmuls are slow on CPU).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = sys.argv[1:]
ONLY = ARGS.pop(ARGS.index("--only") + 1) if "--only" in ARGS else ""
ARGS = [a for a in ARGS if a != "--only"]
MEZOD = ARGS[0] if ARGS else os.path.join(ROOT, "target/release/mezod")

SHAPES = {
    "llama-58m": (
        "llama",
        lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
            max_position_embeddings=512)),
    ),
    "opt-67m": (
        "opt",
        lambda: OPTForCausalLM(OPTConfig(
            vocab_size=32000, hidden_size=768, ffn_dim=3072, num_hidden_layers=6,
            num_attention_heads=12, word_embed_proj_dim=768, max_position_embeddings=512)),
    ),
    "gpt2-36m": (
        "gpt2",
        lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=32000, n_embd=512, n_layer=6, n_head=8, n_positions=512)),
    ),
}

JOBS = [
    # (name, task line, dtype, batch, max_length)
    ("causal b8 T128", "task: {kind: causal_lm, max_length: 128}", "f32", 8, 128),
    ("causal b8 T128 bf16", "task: {kind: causal_lm, max_length: 128}", "bf16", 8, 128),
    ("sst2 b8 T64", "task: {kind: classification, template: sst2, max_length: 64}", "f32", 8, 64),
]


def make_model(name, tmp):
    family, build = SHAPES[name]
    torch.manual_seed(0)
    out = os.path.join(tmp, name)
    build().save_pretrained(out)
    fixture = os.path.join(ROOT, "tests/fixtures", family)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture, f), out)
    return out


def make_data(tmp):
    reviews = [json.loads(l) for l in open(os.path.join(ROOT, "examples/data/reviews.jsonl"))]
    path = os.path.join(tmp, "long.jsonl")
    with open(path, "w") as f:
        for i, r in enumerate(reviews):
            text = " ".join(x["text"] for x in reviews[i:i + 12]) or r["text"]
            f.write(json.dumps({"text": text, "label": r["label"]}) + "\n")
    return path


def main():
    tmp = tempfile.mkdtemp()
    data = make_data(tmp)
    rows = []
    for shape in SHAPES:
        model = make_model(shape, tmp)
        for name, task, dtype, batch, _ in JOBS:
            if ONLY not in name:
                continue
            job = os.path.join(tmp, f"{shape}-{len(rows)}.yaml")
            with open(job, "w") as f:
                f.write(f"model: {{path: {model}, dtype: {dtype}}}\n{task}\n"
                        f"data: {{train: {data}, dev: {data}, max_dev: {batch}}}\n"
                        f"mezo: {{steps: 3, batch_size: {batch}, lr: 1.0e-6}}\n")
            est = json.loads(subprocess.check_output([MEZOD, "estimate", job, "--json"]))
            out = job + ".run"
            subprocess.run([MEZOD, "run", job, "--out", out], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peak = json.load(open(os.path.join(out, "result.json")))["peak_memory_bytes"]
            rows.append((shape, name, est["total"], peak))
    shutil.rmtree(tmp)
    print(f"{'model':<11} {'job':<20} {'estimate MiB':>12} {'peak MiB':>9} {'est/peak':>8}")
    for shape, name, est, peak in rows:
        print(f"{shape:<11} {name:<20} {est / 2**20:>12.1f} {peak / 2**20:>9.1f} {est / peak:>8.2f}")


if __name__ == "__main__":
    main()

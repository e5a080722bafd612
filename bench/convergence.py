"""`make convergence`: zeroth-order estimators compared at an equal number of forward passes.

An estimator's step costs a different number of forward passes (MeZO: two per
direction; FZOO: one per direction plus one at the unperturbed weights), and on a
CPU or a GPU alike forward passes are most of what a step costs. So every estimator
gets the same budget of training forward passes, its dev metric is read at the
same spacing in forward passes, and the curves are compared on that axis.

For each (estimator, seed) the script writes a job file derived from the base job
and runs `mezod run JOB --out OUT/<estimator>-seed<k>`. Rerunning the script is
cheap and safe: `mezod run` answers a finished run from its folder, resumes an
interrupted one exactly, and refuses a folder that holds a different job.

Writes the "## Convergence" section of bench/results.md (other sections stay),
a picture of dev metric against forward passes (bench/convergence.svg), and the
raw curves (OUT/convergence.json).

    python bench/convergence.py [--job JOB] [--estimators mezo,fzoo,sparse,lozo]
        [--seeds 0,1,2] [--budget F] [--eval-every E] [--settings FILE] [--max-test N]
        [--out DIR] [--results FILE] [--picture FILE] [--tiny]

A settings file gives `mezo` fields per estimator, over the base job's and the
estimator's defaults (JSON works too); the base job's own estimator fields
(estimator, directions, sparsity, perturbation) are dropped first. The real
task's are in bench/convergence.yaml:

    fzoo: {directions: 8, lr: 1.0e-4}
    sparse: {sparsity: 0.9}

`--tiny` runs the committed tiny classification fixture with a small budget (a
few seconds; the end-to-end check in tests/convergence.rs) and writes its table
and picture into its output folder unless --results/--picture say otherwise.
The mezod binary is $MEZOD, else target/release/mezod.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEZOD = os.environ.get("MEZOD") or os.path.join(ROOT, "target", "release", "mezod")

Estimator = collections.namedtuple("Estimator", "forward_passes defaults")

# Estimator → forward passes per training step (from the job's `mezo` settings,
# defaults included) and its default `mezo` settings. Adding an estimator is one line.
ESTIMATORS = {
    "mezo": Estimator(lambda m: 2 * m.get("directions", 1), {}),
    "fzoo": Estimator(lambda m: m["directions"] + 1, {"directions": 8}),
    "sparse": Estimator(lambda m: 2 * m.get("directions", 1), {"sparsity": 0.75}),
    "lozo": Estimator(lambda m: 2 * m.get("directions", 1), {"rank": 1, "basis_every": 100}),
}

# `mezo` fields that belong to one estimator, not to the base job's other runs.
ESTIMATOR_KEYS = ("estimator", "directions", "sparsity", "perturbation", "rank", "basis_every")

# (base job, budget, eval spacing, seeds, output folder) for the real task and for --tiny.
# On 2 CPU cores the demo's forward pass of batch 8 takes about 1.3 s and a dev or test
# example about 0.13 s: a run of 200 passes with 5 dev evaluations and 300 test snippets
# is about 8 minutes, so the 12 runs take about 105 minutes. (The demo itself is what compares
# the base and a fine-tuned model on its 1,000 test snippets.)
REAL = dict(job="examples/demo-rotten-tomatoes.yaml", budget=200, eval_every=50,
            seeds="0,1,2", out="runs/convergence", estimators="mezo,fzoo,sparse,lozo",
            settings="bench/convergence.yaml", max_test=300)
TINY = dict(job="examples/classification.yaml", budget=120, eval_every=40,
            seeds="0,1", out="runs/convergence-tiny", estimators="mezo,fzoo,sparse,lozo",
            settings="", max_test=0)

SECTION = "## Convergence"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", help=f"base job file (default {REAL['job']})")
    p.add_argument("--estimators", help="comma-separated, of: " + ", ".join(ESTIMATORS))
    p.add_argument("--seeds", help="comma-separated values of mezo.seed")
    p.add_argument("--budget", type=int, help="training forward passes per run")
    p.add_argument("--eval-every", type=int, help="training forward passes between dev evaluations")
    p.add_argument("--settings", help="YAML/JSON file: {estimator: {mezo setting: value}} "
                   "(default bench/convergence.yaml; with --tiny none)")
    p.add_argument("--max-test", type=int, help="test examples each run scores at its end "
                   "(default 300; 0: as the base job says)")
    p.add_argument("--out", help="folder of the runs (default runs/convergence)")
    p.add_argument("--results", help="markdown file whose Convergence section is rewritten "
                   "(default bench/results.md; with --tiny OUT/results.md)")
    p.add_argument("--picture", help="picture to write, .svg or .png "
                   "(default bench/convergence.svg; with --tiny OUT/convergence.svg)")
    p.add_argument("--tiny", action="store_true", help="the tiny fixture job with a small budget, in seconds")
    args = p.parse_args(argv)
    # Explicit flags win over the preset of the chosen mode.
    for key, value in (TINY if args.tiny else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results is None:
        args.results = os.path.join(args.out, "results.md") if args.tiny else os.path.join(ROOT, "bench/results.md")
    if args.picture is None:
        args.picture = os.path.join(args.out, "convergence.svg") if args.tiny else os.path.join(ROOT, "bench/convergence.svg")
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = [e for e in args.estimators if e not in ESTIMATORS]
    if unknown:
        p.error(f"unknown estimator(s) {', '.join(unknown)}; known: {', '.join(ESTIMATORS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.budget < 1 or args.eval_every < 1:
        p.error("--budget and --eval-every must be at least 1")
    return args


def repo_path(path):
    """Paths given relative to the repository root also work from elsewhere."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(ROOT, path)


def load_settings(path):
    """Per-estimator `mezo` overrides from a file (JSON is YAML too)."""
    if not path:
        return {}
    with open(repo_path(path)) as f:
        settings = yaml.safe_load(f) or {}
    unknown = [e for e in settings if e not in ESTIMATORS]
    if unknown:
        sys.exit(f"{path}: unknown estimator(s) {', '.join(unknown)}; known: {', '.join(ESTIMATORS)}")
    return settings


def plan_run(base, base_dir, estimator, seed, settings, budget, eval_every, max_test=0):
    """The job of one run and its forward passes per step.

    The base job's `mezo` block, then the estimator's defaults, then the
    settings file. `estimator` is written only when it is not the default
    `mezo`, so MeZO's job files are valid for engines that predate the option.
    Relative paths stay anchored at the base job's folder through `workdir`.
    """
    job = json.loads(json.dumps(base))  # a deep copy
    job.setdefault("workdir", base_dir)
    mezo = job["mezo"]
    # The base job's own estimator settings stay with its estimator: a demo job
    # that runs FZOO must not turn the MeZO runs into 8-direction n-SPSA.
    for key in ESTIMATOR_KEYS:
        mezo.pop(key, None)
    mezo.update(ESTIMATORS[estimator].defaults)
    mezo.update(settings.get(estimator) or {})
    if estimator != "mezo":
        mezo["estimator"] = estimator
    fp = ESTIMATORS[estimator].forward_passes(mezo)
    mezo["seed"] = seed
    mezo["steps"] = max(1, budget // fp)
    mezo["eval_every"] = max(1, eval_every // fp)
    if max_test:
        job.setdefault("data", {})["max_test"] = max_test
    return job, fp


def run_one(name, job, out_dir, zero_shot_test=None):
    """Write the job file beside the run folders and run (or resume) it.

    `zero_shot_test`: another run's zero_shot_test.json. The base model's test
    evaluation depends only on the model, the task and the test split, which
    every run here shares (they differ in `mezo` settings only), and on the
    demo it costs as much as a few hundred training forward passes; so a new
    run starts with a copy and skips it. Its folder then holds that file alone,
    which `mezod run` accepts only with --force; a rerun finds its spec.yaml
    and needs none.
    """
    job_dir = os.path.join(out_dir, "jobs")
    os.makedirs(job_dir, exist_ok=True)
    job_file = os.path.join(job_dir, f"{name}.yaml")
    with open(job_file, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False, allow_unicode=True)
    run_dir = os.path.join(out_dir, name)
    force = []
    if zero_shot_test and os.path.isfile(zero_shot_test) and not os.path.exists(run_dir):
        os.makedirs(run_dir)
        shutil.copyfile(zero_shot_test, os.path.join(run_dir, "zero_shot_test.json"))
        force = ["--force"]
    print(f"== {name}: {job['mezo']['steps']} steps", flush=True)
    done = subprocess.run([MEZOD, "run", job_file, "--out", run_dir, *force])
    if done.returncode != 0:
        sys.exit(f"{name}: mezod run failed (exit {done.returncode}); if its job changed, remove "
                 f"{run_dir} or choose another --out")
    return run_dir


def memory_estimate(job_file):
    """The engine's admission estimate of a job in bytes (`mezod estimate --json`):
    `mezod run` records no estimate in result.json, only the daemon does."""
    done = subprocess.run([MEZOD, "estimate", job_file, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout).get("total")


def read_run(run_dir, fp):
    """The dev curve (one point per evaluation, x in forward passes) and result.json."""
    evals = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("kind") == "eval":
                evals[m["step"]] = m  # a resumed run's repeated line counts once
    curve = [{"step": s, "forward_passes": s * fp, "value": evals[s]["value"], "loss": evals[s]["loss"],
              "metric": evals[s]["metric"]} for s in sorted(evals)]
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    return curve, result


def seed_mean(runs):
    """Forward passes and the per-seed values of an estimator's curves (one row per seed)."""
    xs = [p["forward_passes"] for p in runs[0]["curve"]]
    for r in runs:
        if [p["forward_passes"] for p in r["curve"]] != xs:
            sys.exit(f"{r['estimator']} seed {r['seed']}: its evaluations differ from seed {runs[0]['seed']}'s")
    return np.array(xs), np.array([[p["value"] for p in r["curve"]] for r in runs])


def first_reaching(xs, mean, target):
    """Forward passes of the first evaluation whose seed mean reaches `target` (None: never)."""
    hit = np.nonzero(mean >= target - 1e-12)[0]
    return int(xs[hit[0]]) if len(hit) else None


def pm(values, scale=1.0, digits=1):
    """mean ± std of the values that exist; "—" when none do."""
    v = np.array([x for x in values if x is not None], dtype=float) * scale
    if len(v) == 0:
        return "—"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def mib(x):
    return "—" if x is None else f"{x / 2**20:.0f}"


def summarize(by_estimator, budget):
    """The table rows: convergence against the reference (MeZO, else the first listed) and costs."""
    ref = "mezo" if "mezo" in by_estimator else next(iter(by_estimator))
    ref_xs, ref_vals = seed_mean(by_estimator[ref])
    target = ref_vals.mean(0)[-1]
    ref_fp = first_reaching(ref_xs, ref_vals.mean(0), target)
    rows = []
    for name, runs in by_estimator.items():
        xs, vals = seed_mean(runs)
        mean = vals.mean(0)
        reach = first_reaching(xs, mean, target)
        ratio = "—" if reach is None or not ref_fp else f"{reach / ref_fp:.2f}"
        fp = runs[0]["forward_passes_per_step"]
        rows.append({
            "estimator": name,
            "settings": runs[0]["settings"],
            "fp": fp,
            "steps": runs[0]["steps"],
            "reach": "not reached" if reach is None else str(reach),
            "ratio": ratio,
            # Interpolated between evaluations: estimators evaluate on different grids.
            "dev25": f"{100 * np.interp(0.25 * budget, xs, mean):.1f}",
            "dev50": f"{100 * np.interp(0.5 * budget, xs, mean):.1f}",
            "dev": pm(vals[:, -1], 100),
            "test": pm([r["result"].get("test_metric") for r in runs], 100),
            "s_per_fp": pm([1 / (r["result"]["steps_per_s"] * fp) if r["result"].get("steps_per_s") else None
                            for r in runs], digits=3),
            "peak": mib(max(r["result"].get("peak_memory_bytes") or 0 for r in runs) or None),
            "estimate": mib(runs[0]["result"].get("memory_estimate_bytes") or runs[0].get("estimate_bytes")),
        })
    return ref, target, ref_fp, rows


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_of(by_estimator):
    fp = next(iter(by_estimator.values()))[0]["result"].get("fingerprint", {})
    if fp.get("gpu"):
        return fp["gpu"]
    return f"{cpu_name()}, {fp.get('threads', os.cpu_count())} threads"


def section(args, by_estimator, command):
    """The markdown of the Convergence section."""
    ref, target, ref_fp, rows = summarize(by_estimator, args.budget)
    metric = next(iter(by_estimator.values()))[0]["curve"][-1]["metric"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    job = os.path.relpath(args.job, ROOT)
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"{SECTION}: `{command}`, {now}, {device_of(by_estimator)}",
        "",
        f"Base job `{job}`, seeds {seeds} (`mezo.seed`), a budget of {args.budget} training forward passes",
        f"per run, dev {metric} every {args.eval_every} forward passes (rounded down to whole steps).",
        f"Values are in % (mean ± std over seeds). The target is {ref}'s final dev {metric}",
        f"(seed mean {100 * target:.1f}); \"forward passes to reach it\" is the first evaluation whose",
        f"seed mean reaches it, and × {ref} divides by {ref}'s own ({ref_fp}). Dev at 25 % and 50 % of",
        "the budget is the seed mean interpolated between evaluations. Test is "
        + (f"on {args.max_test} held-out snippets." if args.max_test else "on the job's test split."),
        "",
        f"| estimator | settings | forward passes / step | steps | forward passes to reach {ref}'s final dev | × {ref} "
        f"| dev at 25 % | dev at 50 % | dev at budget | test at budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['settings']} | {r['fp']} | {r['steps']} | {r['reach']} | {r['ratio']} "
                     f"| {r['dev25']} | {r['dev50']} | {r['dev']} | {r['test']} |")
    lines += [
        "",
        "Cost: seconds per training forward pass (the training loop's time over its forward passes,",
        "dev evaluations inside the loop included; a resumed run counts its last session), and the",
        "largest peak memory over seeds against the engine's estimate (`result.json`).",
        "",
        "| estimator | s / training forward pass | peak memory (MiB) | estimate (MiB) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['s_per_fp']} | {r['peak']} | {r['estimate']} |")
    picture = os.path.relpath(args.picture, os.path.dirname(os.path.abspath(args.results)))
    lines += ["", f"![dev {metric} against training forward passes]({picture})", ""]
    return "\n".join(lines)


def replace_section(path, text):
    """Rewrite our own section of `path` (up to the next `## ` heading) and keep the rest."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\b.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n")
    with open(path, "w") as f:
        f.write(new.rstrip("\n") + "\n")


def draw(path, by_estimator, budget):
    """Dev metric against forward passes: the seed mean per estimator and its min–max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    metric = "dev"
    for name, runs in by_estimator.items():
        xs, vals = seed_mean(runs)
        metric = f"dev {runs[0]['curve'][-1]['metric']}"
        (line,) = ax.plot(xs, 100 * vals.mean(0), marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(xs, 100 * vals.min(0), 100 * vals.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training forward passes")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_xlim(0, budget)
    ax.set_title(f"{metric}: seed mean, band min–max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    args = parse_args(argv)
    args.job = repo_path(args.job)
    with open(args.job) as f:
        base = yaml.safe_load(f)
    settings = load_settings(args.settings)
    out_dir = os.path.abspath(args.out)
    by_estimator = {}
    zero_shot_test = None
    # Seed-major: an interrupted benchmark has every estimator's first seed.
    for seed in args.seeds:
        for estimator in args.estimators:
            name = f"{estimator}-seed{seed}"
            job, fp = plan_run(base, os.path.dirname(args.job), estimator, seed, settings,
                               args.budget, args.eval_every, args.max_test)
            run_dir = run_one(name, job, out_dir, zero_shot_test)
            zero_shot_test = os.path.join(run_dir, "zero_shot_test.json")
            curve, result = read_run(run_dir, fp)
            estimate_bytes = memory_estimate(os.path.join(out_dir, "jobs", f"{name}.yaml"))
            shown = {k: v for k, v in job["mezo"].items() if k not in ("seed", "steps", "eval_every", "estimator")}
            by_estimator.setdefault(estimator, []).append({
                "estimator": estimator, "seed": seed, "run": name, "forward_passes_per_step": fp,
                "steps": job["mezo"]["steps"], "eval_every_steps": job["mezo"]["eval_every"],
                "settings": ", ".join(f"{k} {v}" for k, v in shown.items()),
                "curve": curve, "result": result, "estimate_bytes": estimate_bytes,
            })
    command = "python bench/convergence.py" + ("" if not argv else " " + shlex.join(argv))
    with open(os.path.join(out_dir, "convergence.json"), "w") as f:
        json.dump({"command": command, "job": args.job, "budget": args.budget, "eval_every": args.eval_every,
                   "runs": [r for runs in by_estimator.values() for r in runs]}, f, indent=1)
    draw(args.picture, by_estimator, args.budget)
    text = section(args, by_estimator, command)
    replace_section(args.results, text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])

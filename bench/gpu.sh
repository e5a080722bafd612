#!/usr/bin/env bash
# mezod on one GPU: step / (2 × forward), NVML peak memory against the
# admission estimate, what two jobs sharing the GPU cost each other, and a
# 20-step bit-identical resume, in under 8 minutes.
#
#   cargo build --release        # on any machine with the same libtorch (2.11.0)
#   bench/gpu.sh                 # on the GPU machine, beside target/release/mezod{,-engine}
#
# The GPU machine needs only the binary, this repository's bench/ and
# tests/fixtures/ folders, and a Python with torch 2.11.0 (CUDA build): the
# script takes libtorch from that torch's lib folder.  Models are random weights
# of real shapes (bench/configs/): SmolLM2-135M, OPT-1.3B and OPT-6.7B, so
# nothing is downloaded.
#
# MEZOD_GPU_DRY=1 runs the same script on the CPU with tiny shapes (to check the
# script itself where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MEZOD=${MEZOD:-$ROOT/target/release/mezod}
PY=${PYTHON:-python3}
DRY=${MEZOD_GPU_DRY:-0}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
RESULTS=$OUT/gpu-bench.jsonl
: >"$RESULTS"
say() { echo "[gpu.sh $(date +%H:%M:%S)] $*" >&2; }

[ -x "$MEZOD" ] || { say "no mezod binary at $MEZOD (build with cargo build --release)"; exit 1; }
[ -x "$(dirname "$MEZOD")/mezod-engine" ] || [ -n "${MEZOD_ENGINE:-}" ] ||
    { say "no mezod-engine beside $MEZOD (mezod run hands over to it)"; exit 1; }
TORCH_LIB=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MEZOD_LOG=${MEZOD_LOG:-warn}
say "libtorch from $TORCH_LIB ($("$PY" -c 'import torch; print(torch.__version__)'))"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    say "dry run on the CPU: tiny shapes, no CUDA or NVML checks"
else
    DEVICE=cuda
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name(0))" >&2
    # mezod's own view: libtorch's CUDA and NVML (the GPU name in the result).
    probe=$("$MEZOD" bench --config tests/fixtures/llama/config.json --device cuda --mode forward --iters 1)
    echo "$probe" | "$PY" -c "
import json, sys
r = json.load(sys.stdin)
assert r['device'] == 'cuda', r
assert r['gpu'], 'mezod sees CUDA but not NVML (libnvidia-ml.so.1): no GPU name, no per-process memory'
assert r['peak_gpu_bytes'], 'NVML gives no memory figure for this process'
print('mezod sees CUDA and NVML:', r['gpu'], file=sys.stderr)"
fi

# name | config | dtype | batch | tokens | iterations (forward, step)
if [ "$DRY" = 1 ]; then
    CASES="tiny-llama f32|tests/fixtures/llama/config.json|f32|4|32|3
tiny-opt bf16|tests/fixtures/opt/config.json|bf16|4|32|3"
else
    CASES="SmolLM2-135M f32|bench/configs/smollm2-135m.json|f32|8|256|10
SmolLM2-135M bf16|bench/configs/smollm2-135m.json|bf16|8|256|10
OPT-1.3B bf16|bench/configs/opt-1.3b.json|bf16|8|256|5
OPT-1.3B f32|bench/configs/opt-1.3b.json|f32|8|256|5
OPT-6.7B bf16|bench/configs/opt-6.7b.json|bf16|8|256|3"
fi

while IFS='|' read -r name config dtype batch tokens iters; do
    for mode in forward step; do
        say "$name: $mode"
        "$MEZOD" bench --config "$config" --device "$DEVICE" --dtype "$dtype" --mode "$mode" \
            --batch "$batch" --tokens "$tokens" --iters "$iters" --threads 8 |
            "$PY" -c "import json, sys; r = json.load(sys.stdin); r['name'] = '''$name'''; print(json.dumps(r))" >>"$RESULTS"
    done
done <<<"$CASES"

# Sharing one device, as the daemon packs jobs by memory: the same step
# benchmark alone, then two copies at once.  Each copy's time per step against
# the lone one's is what sharing costs a job; two steps in that time, what it
# gains the server.
if [ "$DRY" = 1 ]; then
    SHARE="tests/fixtures/opt/config.json|bf16|4|32|20"
else
    SHARE="bench/configs/opt-1.3b.json|bf16|8|256|30"
fi
IFS='|' read -r config dtype batch tokens iters <<<"$SHARE"
share_bench() { # tag
    "$MEZOD" bench --config "$config" --device "$DEVICE" --dtype "$dtype" --mode step \
        --batch "$batch" --tokens "$tokens" --iters "$iters" --threads 4 |
        "$PY" -c "import json, sys; r = json.load(sys.stdin); r['name'] = 'share'; r['share'] = '$1'; print(json.dumps(r))" >>"$RESULTS"
}
say "sharing: one step benchmark alone, then two at once"
share_bench alone
share_bench shared-a & SHARE_A=$!
share_bench shared-b & SHARE_B=$!
wait "$SHARE_A" "$SHARE_B"

# A 20-step job on the device, killed with SIGKILL after some steps and resumed:
# the final weights must equal those of an uninterrupted run, bit for bit.
steps_done() {
    if [ -f "$1" ]; then awk '/"seed"/ { n++ } END { print n + 0 }' "$1"; else echo 0; fi
}
resume_check() {
    local dir=$OUT/resume model=$OUT/resume-model
    rm -rf "$dir" "$model"
    mkdir -p "$dir" "$model"
    if [ "$DRY" = 1 ]; then
        cp tests/fixtures/opt/config.json "$model/config.json"
    else
        cp bench/configs/opt-1.3b.json "$model/config.json"
    fi
    cp tests/fixtures/opt/tokenizer.json "$model/"
    cat >"$dir/job.yaml" <<EOF
model: {config: $model/config.json, init: random, seed: 1, dtype: bf16, device: $DEVICE}
task: {kind: causal_lm, max_length: 128}
data: {train: $ROOT/examples/data/reviews.jsonl, max_dev: 8}
mezo: {steps: 20, batch_size: 8, lr: 1.0e-5, eps: 1.0e-3, seed: 3, snapshot_every: 5}
EOF
    "$MEZOD" run "$dir/job.yaml" --out "$dir/solo" >/dev/null 2>"$dir/solo.log"
    "$MEZOD" run "$dir/job.yaml" --out "$dir/killed" >/dev/null 2>"$dir/killed.log" &
    local pid=$! waited=0
    while [ "$(steps_done "$dir/killed/metrics.jsonl")" -lt 8 ] && kill -0 "$pid" 2>/dev/null; do
        sleep 0.02
        waited=$((waited + 1))
        [ "$waited" -lt 6000 ] || break
    done
    local killed_at
    kill -9 "$pid" 2>/dev/null || true
    killed_at=$(steps_done "$dir/killed/metrics.jsonl")
    wait "$pid" 2>/dev/null || true
    "$MEZOD" run "$dir/job.yaml" --out "$dir/killed" >/dev/null 2>>"$dir/killed.log"
    local a b
    a=$(sha256sum "$dir/solo/model/model.safetensors" | cut -d' ' -f1)
    b=$(sha256sum "$dir/killed/model/model.safetensors" | cut -d' ' -f1)
    local rng
    rng=$("$PY" -c "import json; print(json.load(open('$dir/killed/fingerprint.json'))['rng'])")
    if [ "$a" = "$b" ]; then
        echo "resume: killed after $killed_at of 20 steps, resumed: weights identical (sha256 ${a:0:16}…, rng $rng)"
    else
        echo "resume: killed after $killed_at of 20 steps, resumed: WEIGHTS DIFFER ($a vs $b, rng $rng)"
        return 1
    fi
}
say "resume check"
RESUME=$(resume_check) || RESUME_FAILED=1
say "done; raw results in $RESULTS"

# The table, last.
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
share = [r for r in rows if r["name"] == "share"]
rows = [r for r in rows if r["name"] != "share"]
by = {}
for r in rows:
    by.setdefault(r["name"], {})[r["mode"]] = r
gib = lambda b: f"{b / 2**30:.2f}" if b else "n/a"
gpu = next((r["gpu"] for r in rows if r.get("gpu")), None) or rows[0]["device"]
print(f"\nmezod on {gpu}, z drawn by {rows[0]['rng']}")
print("| model | batch × tokens | params | forward (s) | step (s) | step / (2 × forward) | peak by NVML (GiB) | estimate (GiB) | estimate / peak |")
print("|---|---|---|---|---|---|---|---|---|")
for name, m in by.items():
    f, s = m["forward"], m["step"]
    peak = s.get("peak_gpu_bytes") or s["peak_rss_bytes"]
    print(f"| {name} | {f['batch']} × {f['tokens']} | {f['parameters'] / 1e9:.2f} B | {f['seconds_per_iter']:.4f} | {s['seconds_per_iter']:.4f} | "
          f"{s['seconds_per_iter'] / (2 * f['seconds_per_iter']):.3f} | {gib(peak)} | {gib(s['estimate_bytes'])} | "
          f"{s['estimate_bytes'] / peak:.2f} |")
alone = next(r["seconds_per_iter"] for r in share if r["share"] == "alone")
shared = [r["seconds_per_iter"] for r in share if r["share"] != "alone"]
mean = sum(shared) / len(shared)
print(f"sharing one device ({share[0]['parameters'] / 1e9:.2f} B params, {share[0]['batch']} × {share[0]['tokens']}): "
      f"a step takes {alone:.4f} s alone, {mean:.4f} s with a second job at once: "
      f"each job {mean / alone:.2f}× slower, the device {2 * alone / mean:.2f}× the steps per second")
EOF
echo "$RESUME"
[ -z "${RESUME_FAILED:-}" ]

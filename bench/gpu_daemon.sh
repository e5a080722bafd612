#!/usr/bin/env bash
# The daemon on a real GPU: NVML admission, two jobs sharing one GPU, a daemon
# stop and restart in the middle, and the resumed job's weights against a solo
# `mezod run` of the same job, bit for bit.  About 3 minutes on an H100/H200.
#
#   cargo build --release        # on any machine with the same libtorch (2.11.0)
#   bench/gpu_daemon.sh          # on the GPU machine, beside target/release/mezod{,-engine}
#
# Needs what bench/gpu.sh needs (a Python with torch 2.11.0 for libtorch).
# MEZOD_GPU_DRY=1 runs the same steps on the CPU with the tiny fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MEZOD=${MEZOD:-$ROOT/target/release/mezod}
PY=${PYTHON:-python3}
DRY=${MEZOD_GPU_DRY:-0}
OUT=${OUT:-$(mktemp -d)}
DIR=$OUT/daemon
rm -rf "$DIR"
mkdir -p "$DIR"
say() { echo "[gpu_daemon.sh $(date +%H:%M:%S)] $*" >&2; }

TORCH_LIB=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The fixtures' steps take milliseconds: the dry run's jobs are longer, so that
# the daemon stop lands in the middle of the big one rather than after its end.
if [ "$DRY" = 1 ]; then
    DEVICE=cpu BIG=tests/fixtures/opt/config.json SMALL=tests/fixtures/llama/config.json STEPS=600
else
    DEVICE=cuda BIG=bench/configs/opt-1.3b.json SMALL=bench/configs/smollm2-135m.json STEPS=60
fi
job() { # name config steps
    local model=$DIR/model-$1
    mkdir -p "$model"
    cp "$2" "$model/config.json"
    cp tests/fixtures/opt/tokenizer.json "$model/"
    cat >"$DIR/$1.yaml" <<EOF
model: {config: $model/config.json, init: random, seed: 1, dtype: bf16, device: $DEVICE}
task: {kind: causal_lm, max_length: 128}
data: {train: $ROOT/examples/data/reviews.jsonl, max_dev: 8}
mezo: {steps: $3, batch_size: 8, lr: 1.0e-5, eps: 1.0e-3, seed: 3}
EOF
}
job big "$BIG" "$STEPS"
job small "$SMALL" "$STEPS"

printf 'jobs_per_gpu: 2\ncpu_slots: 2\nmemory_margin_mib: 512\nsnapshot_every: 10\nretry_limit: 0\n' >"$DIR/daemon.yaml"
SOCK=$DIR/run/mezod.sock
start_daemon() {
    MEZOD_LOG=info "$MEZOD" daemon --config "$DIR/daemon.yaml" --spool "$DIR/spool" \
        --state "$DIR/state" --runtime "$DIR/run" 2>>"$DIR/daemon.log" &
    DAEMON=$!
    local i=0
    until "$MEZOD" status --socket "$SOCK" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 300 ] || { say "the daemon did not start"; tail "$DIR/daemon.log"; exit 1; }
        sleep 0.1
    done
}
field() { # id field
    "$MEZOD" status "$1" --json --socket "$SOCK" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['$2'])"
}
wait_for() { # id what predicate-on-(state steps)
    local i=0
    while :; do
        local st steps
        st=$(field "$1" state) steps=$(field "$1" steps_done)
        if eval "$3"; then return 0; fi
        case $st in done | failed | cancelled) say "job $1 is $st: $(field "$1" reason)"; return 1 ;; esac
        i=$((i + 1)); [ $i -lt 3000 ] || { say "timed out waiting for job $1 to $2"; return 1; }
        sleep 0.2
    done
}

start_daemon
A=$("$MEZOD" submit "$DIR/big.yaml" --socket "$SOCK")
B=$("$MEZOD" submit "$DIR/small.yaml" --socket "$SOCK")
say "submitted jobs $A (big) and $B (small)"
wait_for "$A" "reach step 20" '[ "$steps" -ge 20 ]'
"$MEZOD" status --socket "$SOCK" | tee "$DIR/status-running.txt" >&2
PEAK_A=$(field "$A" peak_bytes)
say "stopping the daemon at step $(field "$A" steps_done) of job $A"
kill -TERM "$DAEMON"
wait "$DAEMON" || true
start_daemon
wait_for "$A" "finish" '[ "$st" = done ]'
wait_for "$B" "finish" '[ "$st" = done ]'
"$MEZOD" status --socket "$SOCK" --json >"$DIR/status-done.json"
kill -TERM "$DAEMON"
wait "$DAEMON" || true

say "the same big job alone, uninterrupted"
"$MEZOD" run "$DIR/big.yaml" --out "$DIR/solo" >/dev/null 2>"$DIR/solo.log"

"$PY" - "$DIR" "$A" "$B" "$PEAK_A" <<'EOF'
import hashlib, json, sys
d, a, b, peak_a = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
status = json.load(open(f"{d}/status-done.json"))
jobs = {j["id"]: j for j in status["jobs"]}
gib = lambda x: f"{x / 2**30:.2f}"
print(f"\nmezod daemon on {', '.join(p['name'] for p in status['pools'])}")
print("| job | state | attempts | GPUs | estimate (GiB) | NVML peak seen by the daemon (GiB) | peak in result.json (GiB) |")
print("|---|---|---|---|---|---|---|")
for i, name in [(a, "OPT-1.3B bf16 (stopped, resumed)"), (b, "SmolLM2-135M bf16")]:
    j = jobs[i]
    r = json.load(open(f"{d}/state/jobs/{i}/run/result.json"))
    print(f"| {name} | {j['state']} | {j['attempts']} | {len(j['gpus'])} | {gib(j['estimate_bytes'])} | "
          f"{gib(j['peak_bytes'])} | {gib(r['peak_memory_bytes'])} ({r['peak_memory_source']}) |")
log = open(f"{d}/state/jobs/{a}/worker.log").read()
lines = [l for l in log.splitlines() if "CUDA_VISIBLE_DEVICES" in l or l.startswith("--- attempt")]
print("\n".join(lines[:4]))
x, y = sha(f"{d}/state/jobs/{a}/run/model/model.safetensors"), sha(f"{d}/solo/model/model.safetensors")
print(f"daemon job stopped at step ~20 and resumed vs solo run: "
      f"{'weights identical' if x == y else 'WEIGHTS DIFFER'} (sha256 {x[:16]}…); "
      f"NVML peak before the stop {gib(peak_a)} GiB")
sys.exit(0 if x == y else 1)
EOF

#!/bin/sh
# `make demo`: the Rotten Tomatoes job through the daemon, as a user would run it.
# Starts a daemon on runs/demo/ (or resumes the one left there), submits the job
# once, follows its log, prints a short report, and stops the daemon.
# Interrupt it at any point and run it again: the job resumes where it stopped.
set -eu
cd "$(dirname "$0")/.."
MEZOD=target/release/mezod
JOB=examples/demo-rotten-tomatoes.yaml
DIR=runs/demo
SOCK=$DIR/run/mezod.sock
mkdir -p "$DIR"
chmod go-w "$DIR"

printf 'cpu_slots: 1\nmemory_margin_mib: 256\nsnapshot_every: 10\n' > "$DIR/daemon.yaml"
MEZOD_LOG=info "$MEZOD" daemon --config "$DIR/daemon.yaml" --spool "$DIR/spool" \
    --state "$DIR/state" --runtime "$DIR/run" 2>> "$DIR/daemon.log" &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT INT TERM
i=0
until "$MEZOD" status --socket "$SOCK" > /dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "the daemon did not start; see $DIR/daemon.log"; exit 1; }
    sleep 0.1
done

if [ -f "$DIR/job-id" ]; then
    ID=$(cat "$DIR/job-id")
    echo "resuming job $ID (the daemon picked it up from its state)"
else
    ID=$("$MEZOD" submit "$JOB" --socket "$SOCK")
    echo "$ID" > "$DIR/job-id"
fi
"$MEZOD" status "$ID" --socket "$SOCK"
echo "--- job $ID log (mezod logs $ID --follow) ---"
"$MEZOD" logs "$ID" --follow --socket "$SOCK"
"$MEZOD" status "$ID" --socket "$SOCK" --json > "$DIR/status.json"
RUN=$DIR/state/jobs/$ID/run
.venv/bin/python - "$RUN" "$DIR/status.json" <<'PY'
import json, sys
run, status = sys.argv[1], sys.argv[2]
job = json.load(open(status))
if job["state"] != "done":
    print(f"job {job['id']} ended {job['state']}: {job['reason']}")
    sys.exit(1)
r = json.load(open(f"{run}/result.json"))
pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
pts = lambda v: f"{100 * v:+.1f}"
test = f"base model {pct(r['zero_shot_test'])}, fine-tuned {pct(r['test_metric'])}"
p = r.get("test_paired")
if p:
    pv = f"{p['mcnemar_p']:.3f}" if p["mcnemar_p"] >= 0.001 else f"{p['mcnemar_p']:.1e}"
    test = (f"{pct(p['base'])} → {pct(p['tuned'])} ({pts(p['difference'])} points, "
            f"{100 * p['confidence']:.0f}% CI {pts(p['ci_low'])} to {pts(p['ci_high'])}, "
            f"McNemar p = {pv}, n = {p['n']})")
print(f"""
Rotten Tomatoes with SmolLM2-135M-Instruct, MeZO ({r['steps']} steps, {r['wall_time_s'] / 60:.1f} min):
  dev accuracy   zero-shot {pct(r['zero_shot'])}, best {pct(r['best'])} (step {r['best_step']}), final {pct(r['final_metric'])}
  test accuracy  {test}
  peak memory    {r['peak_memory_bytes'] / 2**20:.0f} MiB measured, {(r['memory_estimate_bytes'] or 0) / 2**20:.0f} MiB estimated
  loss curve     {run}/loss.svg
  model          {run}/model (a Hugging Face directory)""")
PY

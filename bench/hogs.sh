#!/bin/sh
# A victim's latency under one user's hogs, on a real root daemon:
#   bench/hogs.sh [BIN_DIR]        (default target/release; run as root)
#
# User 65534 (the hog) and user 65533 (the victim) share a daemon in CPU
# mode.  For each hog the victim's latency is measured side by side with the
# same command on the idle daemon:
#   - connections: the hog holds 400 idle connections to the control socket;
#     the victim's `mezod status` (time until it answers);
#   - intake: the hog drops 40 job files named 000-* whose checks are slow
#     (a random-weight config: the check starts the engine for its shapes);
#     the victim drops one job file (time until its job is taken).
# Not a test: nothing here asserts a time (tests/red_team.rs asserts the
# order instead).  BIN_DIR may hold an older build, for a before/after table.
set -eu
cd "$(dirname "$0")/.."
BIN=$(cd "${1:-target/release}" && pwd)
HOG=65534
VICTIM=65533
[ "$(id -u)" = 0 ] || { echo "run as root (the hogs are other users)" >&2; exit 1; }

ROOT=$(mktemp -d)
chmod 755 "$ROOT"
DAEMON_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    pkill -u $HOG -f "mezod-hog" 2>/dev/null || true
    rm -rf "$ROOT"
}
trap cleanup EXIT INT TERM

printf 'cpu_slots: 1\nmemory_margin_mib: 64\nrescan_interval_s: 1\n' > "$ROOT/daemon.yaml"
SOCK="$ROOT/run/mezod.sock"
MEZOD_LOG=warn "$BIN/mezod" daemon --config "$ROOT/daemon.yaml" --spool "$ROOT/spool" \
    --state "$ROOT/state" --runtime "$ROOT/run" 2>"$ROOT/daemon.log" &
DAEMON_PID=$!
i=0
until [ -S "$SOCK" ]; do
    i=$((i + 1)); [ $i -lt 300 ] || { cat "$ROOT/daemon.log" >&2; exit 1; }
    sleep 0.1
done

as() { uid=$1; shift; setpriv --reuid="$uid" --regid="$uid" --clear-groups "$@"; }
now_ms() { date +%s%3N; }
status_ms() {
    t0=$(now_ms)
    as $VICTIM timeout 120 "$BIN/mezod" status --socket "$SOCK" >/dev/null 2>&1 || true
    echo $(($(now_ms) - t0))
}

# A job file on the tiny llama fixture, readable by everyone.
FIX=$(pwd)/tests/fixtures/llama
DATA=$(pwd)/examples/data/reviews.jsonl
job() { # job NAME MODEL_LINE
    cat <<EOF
name: $1
model: {$2, dtype: f32, device: cpu}
task: {kind: causal_lm, max_length: 64}
data: {train: $DATA}
mezo: {steps: 2, batch_size: 2, lr: 1.0e-3, eps: 1.0e-3}
EOF
}
drop() { # drop UID NAME TEXT
    printf '%s\n' "$3" > "$ROOT/$2"
    chown "$1:$1" "$ROOT/$2"
    mv "$ROOT/$2" "$ROOT/spool/new/$2"
}
taken_ms() { # taken_ms NAME: drop the victim's job, time until it is a job
    t0=$(now_ms)
    drop $VICTIM "$1.yaml" "$(job "$1" "path: $FIX")"
    i=0
    until as $VICTIM "$BIN/mezod" status --socket "$SOCK" --json 2>/dev/null | grep -q "\"$1\""; do
        i=$((i + 1)); [ $i -lt 1200 ] || break
        sleep 0.05
    done
    echo $(($(now_ms) - t0))
}

idle_status=$(status_ms)
as $HOG perl -e '
    $0 = "mezod-hog";
    use IO::Socket::UNIX;
    my @s;
    for (1 .. 400) {
        my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or last;
        push @s, $c;
    }
    sleep 120;' "$SOCK" &
sleep 2
hogged_status=$(status_ms)
pkill -u $HOG -f "mezod-hog" || true
sleep 1

idle_taken=$(taken_ms victim-idle)
mkdir -p "$ROOT/m"
cp "$FIX/config.json" "$ROOT/m/config.json"
n=0
while [ $n -lt 40 ]; do
    drop $HOG "$(printf '000-hog-%02d.yaml' $n)" "$(job "hog$n" "config: $ROOT/m/config.json, init: random")"
    n=$((n + 1))
done
sleep 0.5
hogged_taken=$(taken_ms victim-hogged)

echo "| victim's command | idle daemon (ms) | under the hog (ms) |"
echo "|---|---|---|"
echo "| \`mezod status\`, 400 idle connections of another user | $idle_status | $hogged_status |"
echo "| job file taken, 40 slow files of another user first | $idle_taken | $hogged_taken |"

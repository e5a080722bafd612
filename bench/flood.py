#!/usr/bin/env python3
"""A flood of jobs against a real daemon: intake time, `mezod status` latency,
daemon memory and its idle CPU, with N jobs queued and then with N jobs ended.

    python3 bench/flood.py [N] [--mezod target/release/mezod]

The daemon runs in a temporary folder with `cpu_slots: 0`, so nothing starts:
the flood measures the control plane alone (spool intake, the job table, the
main loop, the socket).  Files are dropped the way `mezod submit` drops them
(written in tmp/, renamed into new/).  After the queued phase every job is
cancelled over the control socket, which leaves N ended jobs in the table: the
daemon's loop should then cost what an empty queue costs.  Not a test: it
prints figures and asserts nothing about time.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(sock_path, req):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def status_latency(mezod, sock_path, runs=15):
    """Median wall time of `mezod status` (the text view), and its output size."""
    times, size = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run([mezod, "status", "--socket", sock_path],
                             check=True, capture_output=True).stdout
        times.append(time.perf_counter() - t)
        size = len(out)
    return statistics.median(times), size


def idle_cpu(pid, seconds=10.0):
    """Share of one core the daemon burns while nothing happens."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)


def measure(label, mezod, sock_path, pid, rows):
    lat, size = status_latency(mezod, sock_path)
    rows.append({
        "phase": label,
        "status_ms": lat * 1e3,
        "status_bytes": size,
        "rss_mib": proc_status(pid, "VmRSS") / 2**20,
        "hwm_mib": proc_status(pid, "VmHWM") / 2**20,
        "idle_cpu": idle_cpu(pid),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    })
    print(f"[flood] {label}: {rows[-1]}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=1000)
    ap.add_argument("--mezod", default=os.path.join(ROOT, "target/release/mezod"))
    args = ap.parse_args()
    mezod = os.path.abspath(args.mezod)
    tmp = tempfile.mkdtemp(prefix="mezod-flood-")
    try:
        run(mezod, tmp, args.n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(mezod, tmp, n):
    with open(os.path.join(tmp, "daemon.yaml"), "w") as f:
        f.write("cpu_slots: 0\nrescan_interval_s: 5\n")
    job = (
        f"model: {{path: {ROOT}/tests/fixtures/llama, dtype: f32}}\n"
        "task: {kind: causal_lm, max_length: 32}\n"
        f"data: {{train: {ROOT}/examples/data/reviews.jsonl}}\n"
        "mezo: {steps: 5, batch_size: 2, lr: 1.0e-3}\n"
    )
    sock_path = os.path.join(tmp, "run", "mezod.sock")
    log = open(os.path.join(tmp, "daemon.log"), "w")
    env = dict(os.environ, MEZOD_LOG="warn")
    daemon = subprocess.Popen(
        [mezod, "daemon", "--config", os.path.join(tmp, "daemon.yaml"),
         "--spool", os.path.join(tmp, "spool"), "--state", os.path.join(tmp, "state"),
         "--runtime", os.path.join(tmp, "run")],
        stdout=subprocess.DEVNULL, stderr=log, env=env)
    rows = []
    try:
        deadline = time.time() + 30
        while True:
            try:
                request(sock_path, "hello")
                break
            except OSError:
                if daemon.poll() is not None or time.time() > deadline:
                    sys.exit(f"the daemon did not start; see {log.name}")
                time.sleep(0.05)
        measure("empty", mezod, sock_path, daemon.pid, rows)

        spool = os.path.join(tmp, "spool")
        t0 = time.perf_counter()
        for i in range(n):
            name = f"flood-{i:06d}.yaml"
            with open(os.path.join(spool, "tmp", name), "w") as f:
                f.write(job)
            os.rename(os.path.join(spool, "tmp", name), os.path.join(spool, "new", name))
        dropped = time.perf_counter() - t0
        cur = os.path.join(spool, "cur")
        while len(os.listdir(cur)) < n:
            if daemon.poll() is not None:
                sys.exit(f"the daemon died during intake; see {log.name}")
            time.sleep(0.2)
        intake = time.perf_counter() - t0
        print(f"[flood] {n} files dropped in {dropped:.1f}s, all accepted after {intake:.1f}s",
              file=sys.stderr)
        measure(f"{n} queued", mezod, sock_path, daemon.pid, rows)

        t0 = time.perf_counter()
        for i in range(1, n + 1):
            r = request(sock_path, {"cancel": {"id": i}})
            assert "cancelled" in r, r
        cancel = time.perf_counter() - t0
        measure(f"{n} ended", mezod, sock_path, daemon.pid, rows)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)

    print(f"\nmezod daemon flood: {n} jobs; intake {intake:.1f}s ({n / intake:.0f} jobs/s), "
          f"cancel over the socket {cancel:.1f}s")
    print("| phase | `mezod status` (ms, median of 15) | its output (bytes) | daemon RSS (MiB) "
          "| peak RSS (MiB) | idle CPU (share of a core) | threads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['status_ms']:.1f} | {r['status_bytes']} | {r['rss_mib']:.1f} "
              f"| {r['hwm_mib']:.1f} | {r['idle_cpu']:.3f} | {r['threads']} |")


if __name__ == "__main__":
    main()

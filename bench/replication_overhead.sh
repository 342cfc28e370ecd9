#!/usr/bin/env bash
# bench/replication_overhead.sh: what sync replication to Redis adds to a demo node's latency.
#
# One backend-demo node at a time, release build, loopback: `--store memory` (no replication)
# against `--store redis://... --replication sync` (every visit is written to Redis before the
# response) and `--replication async`. A keep-alive client sends N sequential POST /visit on one
# session; the table gives p50 and p99 and the p99 difference to memory. Rounds are interleaved.
#
#   bench/replication_overhead.sh      # N=2000 ROUNDS=5
#
# Needs: redis-server, python3, curl. It starts its own redis-server on a free port.
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
N=${N:-2000} ROUNDS=${ROUNDS:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-repl.XXXXXX) NAME=replication_overhead
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need redis-server python3 curl
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >"$W/redis.log" 2>&1 &
PIDS+=($!)
cd "$ROOT" && cargo build --release -q -p backend-demo

run() {   # label store-args... -> appends "label p50 p99" (ms) to results
    local label=$1; shift
    "$ROOT/target/release/backend-demo" --id bench --listen 127.0.0.1:0 "$@" >"$W/node.out" 2>"$W/node.log" &
    local pid=$!
    for _ in $(seq 100); do grep -q listening "$W/node.out" && break; sleep 0.05; done
    local addr; addr=$(awk '{print $NF}' "$W/node.out")
    python3 - "$addr" "$N" "$label" >>"$W/results.tsv" <<'PY'
import http.client, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, label = int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(host, int(port))
cookie, lat = None, []
for i in range(n + 100):
    t = time.perf_counter()
    c.request("POST", "/visit", headers={"Cookie": cookie} if cookie else {})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"{label}: status {r.status}")
    if i >= 100:  # warm-up excluded
        lat.append((time.perf_counter() - t) * 1000)
    if cookie is None:
        cookie = r.getheader("set-cookie").split(";")[0]
lat.sort()
print(f"{label}\t{lat[len(lat)//2]:.3f}\t{lat[int(len(lat)*0.99)]:.3f}")
PY
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq "$ROUNDS"); do
    run memory --store memory
    run redis-sync --store "redis://127.0.0.1:$RP" --redis-prefix "bench$round:" --replication sync
    run redis-async --store "redis://127.0.0.1:$RP" --redis-prefix "bencha$round:" --replication async
    echo "round $round/$ROUNDS done" >&2
done
python3 - "$W/results.tsv" "$N" "$ROUNDS" <<'PY'
import statistics, sys
by = {}
for line in open(sys.argv[1]):
    label, p50, p99 = line.split()
    by.setdefault(label, []).append((float(p50), float(p99)))
print(f"\n{sys.argv[3]} interleaved rounds x {sys.argv[2]} sequential POST /visit on one keep-alive connection\n")
print("| store | p50 ms (median) | p99 ms (median) | p99 added vs memory |")
print("|---|---|---|---|")
base = [p99 for _, p99 in by["memory"]]
for label in ["memory", "redis-sync", "redis-async"]:
    p50 = statistics.median(v[0] for v in by[label])
    p99 = statistics.median(v[1] for v in by[label])
    added = statistics.median(v[1] - b for v, b in zip(by[label], base))
    print(f"| {label} | {p50:.3f} | {p99:.3f} | {added:+.3f} ms |")
PY

#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions stickylb spends per proxied request, counted by
# valgrind's callgrind. Unlike requests/s on a shared machine, the count barely moves between runs
# (about 0.1%), so it can judge small changes to the request path.
#
#   bench/instructions.sh [BINARY]    # REQUESTS=2000 CONNS=10 BASE_PORT=29300
#   BODY=262144 bench/instructions.sh  # responses of that many bytes (default: 2, "A\n")
#   CACHE=1 bench/instructions.sh      # also callgrind's simulated cache and branch misses
#
# CACHE=1 simulates this machine's first-level caches (callgrind reads their sizes from the CPU)
# and the branch predictor, and prints each count per request: I1 misses are 64-byte lines of
# code fetched again, about how much code a request runs through that the cache does not keep.
# Simulated, not measured: where perf has no hardware counters (virtual machines here) it is
# what there is to compare two builds' footprints by. These counts include the allocator's
# housekeeping, when it ran.
#
# One nginx upstream, stickylb (one worker) under callgrind with instrumentation off; a warm-up of
# 500 keep-alive requests carrying the affinity cookie, then instrumentation on for REQUESTS more.
# The allocator collection a worker makes when it wakes from a quiet spell (module allocator,
# about 1.1 million instructions, at most once a second) is counted apart: under valgrind the
# requests run so slowly that the worker sleeps between them, which it does not at full speed.
# Needs: apt-get install valgrind nginx (and curl, python3).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
REQUESTS=${REQUESTS:-2000} CONNS=${CONNS:-10} BP=${BASE_PORT:-29300}
P_UP=$((BP + 1)) P_OURS=$((BP + 2))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/stickylb}
W=$(mktemp -d /tmp/stickylb-ir.XXXXXX) NAME=instructions
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need valgrind callgrind_control callgrind_annotate nginx curl python3
if [[ -n ${BODY:-} ]]; then   # a static file of BODY bytes, readable by nginx's unprivileged worker
    mkdir -p "$W/files" && head -c "$BODY" /dev/zero | tr '\0' x >"$W/files/index.html"
    chmod a+rx "$W" "$W/files" && chmod a+r "$W/files/index.html"
    nginx_run up "$P_UP" "server { listen 127.0.0.1:$P_UP; root $W/files; location / { try_files /index.html =404; } }"
else
    upstream_run up "$P_UP" A
fi
stickylb_toml "$P_OURS" "" "$P_UP" >"$W/stickylb.toml"
[[ -n ${1:-} ]] || (cd "$ROOT" && cargo build --release -q -p stickylb)
SIM=()
[[ ${CACHE:-0} == 1 ]] && SIM=(--cache-sim=yes --branch-sim=yes)
RUST_LOG=warn valgrind --tool=callgrind "${SIM[@]}" --instr-atstart=no --callgrind-out-file="$W/cg.%p" \
    "$BIN" -c "$W/stickylb.toml" >"$W/stickylb.log" 2>&1 &
VG=$!; PIDS+=($VG); wait_port "$P_OURS"
COOKIE=$(stickylb_cookie "$P_OURS")
load() {   # requests -> sends them over CONNS keep-alive connections, checking each answer
    python3 -c '
import asyncio, sys
port, conns, n, cookie = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = f"GET / HTTP/1.1\r\nHost: bench\r\nCookie: {cookie}\r\n\r\n".encode()
async def one(k):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(k):
        w.write(req); await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await r.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
    w.close()
async def main():
    await asyncio.gather(*(one(n // conns) for _ in range(conns)))
asyncio.run(main())' "$P_OURS" "$CONNS" "$1" "$COOKIE"
}
load 500
callgrind_control -i on "$VG" >/dev/null
load "$REQUESTS"
callgrind_control -i off "$VG" >/dev/null
callgrind_control -d "$VG" >/dev/null 2>&1
ALL=$(awk '/^totals:/ {print $2}' "$W"/cg.*.1)
HK=$(callgrind_annotate --threshold=100 --inclusive=yes "$W"/cg.*.1 2>/dev/null |
    awk '/stickylb::allocator::collect/ && !done {gsub(",", "", $1); print $1; done = 1}')
IR=$((ALL - ${HK:-0}))
echo "$(basename "$BIN"): $IR instructions for $REQUESTS requests = $((IR / REQUESTS)) per request (allocator housekeeping apart: ${HK:-0}; profile: $(ls "$W"/cg.*.1))"
if [[ ${CACHE:-0} == 1 ]]; then   # each simulated event per request, by callgrind's names
    awk -v n="$REQUESTS" '/^events:/ {for (i = 2; i <= NF; i++) name[i] = $i}
        /^totals:/ {for (i = 3; i <= NF; i++) printf "%s %.0f  ", name[i], $i / n; print ""}' "$W"/cg.*.1
fi

#!/usr/bin/env bash
# bench/idle_rss.sh: resident memory of stickylb and HAProxy holding thousands of idle keep-alive
# client connections, same upstream, same machine, one after the other.
#
#   bench/idle_rss.sh            # CONNS=9000 BASE_PORT=29080 SETTLE=10 (seconds idle before measuring)
#   STICKYLB=/tmp/old/stickylb bench/idle_rss.sh   # measure another stickylb build
#
# HAProxy insists on two descriptors per maxconn; under this machine's hard limit of 20000 open
# files that caps it below 10,000 clients, hence 9,000 by default.
#
# Each client sends one request (so the connection is a real keep-alive one, not just accepted),
# reads the answer and stays idle. RSS is VmRSS from /proc before and with the connections open.
# Needs: apt-get install haproxy nginx (and curl, python3).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
CONNS=${CONNS:-9000} BP=${BASE_PORT:-29080} SETTLE=${SETTLE:-10}
P_UP=$((BP + 1)) P_HAPROXY=$((BP + 10)) P_OURS=$((BP + 12))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-rss.XXXXXX) NAME=idle_rss
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need haproxy nginx curl python3
ulimit -n "$(ulimit -Hn)"   # each process holds about CONNS descriptors
(( $(ulimit -n) > CONNS + 1024 )) || die "open-file limit $(ulimit -n) is too low for $CONNS connections"
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

upstream_run up "$P_UP" A

cat >"$W/haproxy.cfg" <<CONF
global
  nbthread 1
  # Idle clients hold no server connection, so one descriptor per client is enough; left to
  # itself HAProxy would ask for two per maxconn and refuse to start under a 20000 hard limit.
  ulimit-n $(ulimit -n)
  maxconn $((CONNS + 100))
defaults
  mode http
  maxconn $((CONNS + 100))
  timeout connect 1s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
backend be
  cookie SRV insert indirect nocache
  server A 127.0.0.1:$P_UP cookie A
CONF
stickylb_toml "$P_OURS" "[timeouts]
client_header = \"300s\"
[limits]
max_connections = $((CONNS + 1000))
[health]
interval = \"1s\"
" "$P_UP" >"$W/stickylb.toml"

# The client program is passed with -c: its stdin must stay the pipe that tells it when to let go.
read -r -d '' HOLD_PY <<'PY' || true
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    await r.readexactly(length)
    conns.append((r, w))
async def main():
    conns = []
    for i in range(0, n, 500):
        await asyncio.gather(*(one(conns) for _ in range(min(500, n - i))))
    print("ready", len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY
hold() {   # port -> opens CONNS idle keep-alive connections, prints "ready", holds until stdin closes
    python3 -c "$HOLD_PY" "$1" "$CONNS"
}

measure() {   # label pid port
    local before with
    before=$(rss_kb "$2")
    coproc HOLD { hold "$3"; }
    read -r line <&"${HOLD[0]}"
    [[ $line == "ready $CONNS" ]] || die "$1: clients did not all connect: $line"
    # Idle means idle for a while: each proxy gets to release what it frees. stickylb's last
    # upstream connections close 4 s (timeouts.backend_idle) after the last request, and what
    # they freed goes back on the next wakes of its worker (module allocator): 5 s was sometimes
    # too short for that, 10 s has always been enough.
    sleep "$SETTLE"
    with=$(rss_kb "$2")
    exec {HOLD[1]}>&-
    wait "$HOLD_PID" || true
    printf '| %s | %s | %s | %s |\n' "$1" "$((before / 1024))" "$((with / 1024))" "$(( (with - before) * 1024 / CONNS ))"
}

cd "$ROOT" && cargo build --release -q -p stickylb
haproxy -db -f "$W/haproxy.cfg" >"$W/haproxy.log" 2>&1 &
HP=$!; PIDS+=($HP); wait_port "$P_HAPROXY"
RUST_LOG=warn "${STICKYLB:-$ROOT/target/release/stickylb}" -c "$W/stickylb.toml" >"$W/stickylb.log" 2>&1 &
OP=$!; PIDS+=($OP); wait_port "$P_OURS"
echo
echo "| proxy | RSS idle (MiB) | RSS with $CONNS idle keep-alive clients (MiB) | bytes per connection |"
echo "|---|---|---|---|"
measure haproxy "$HP" "$P_HAPROXY"
measure stickylb "$OP" "$P_OURS"

#!/usr/bin/env bash
# bench/run.sh: stickylb against HAProxy and nginx, side by side, on loopback.
#
# Two nginx upstreams (A, B); each proxy in front of them with a sticky cookie pinned to A, one
# worker thread, no access log; wrk with keep-alive and that cookie. Rounds are interleaved
# (every target once per round, the order rotated each round), and the table gives medians and
# the median of per-round ratios against HAProxy. Compare within one run only: the machine is
# shared and noisy.
# It also gives each proxy's CPU time per request, user and kernel apart (from /proc/PID/stat):
# the kernel's share (loopback TCP on both legs) is the same work for every proxy. A second table
# gives what each proxy costs the upstream on its core: upstream A's CPU time and wake-ups per
# request, and how often the proxy was preempted (/proc/PID/status context switches). Last, the
# per-round requests/s ratios (each target / HAProxy, stickylb / each COMPARE build).
#
#   bench/run.sh            # ROUNDS=5 DUR=10 CONNS=50 LOAD_CPU=0 PROXY_CPU=1 BASE_PORT=28080
#   COMPARE="base=/tmp/old/stickylb" bench/run.sh   # also measure other stickylb builds (A/B)
#   FORWARD=1 bench/run.sh   # HAProxy and nginx also send the forwarding headers stickylb always
#                            # sends (X-Forwarded-For, -Proto, -Host, X-Real-IP): the same work
#   CEILING=1 bench/run.sh   # also HAProxy as a plain TCP relay to upstream A ("tcp-relay"): the
#                            # same socket work with no HTTP work, so near the most any proxy gets;
#                            # the ratios then also give each stickylb build against it
#   FLOOR=1 bench/run.sh     # also examples/hyper_floor.rs ("hyper-floor"): hyper's HTTP/1 server
#                            # and client with nothing of stickylb's between them
#   RAW=1 bench/run.sh       # also examples/raw_floor.rs ("raw-floor"): httparse for the heads
#                            # and bytes copied, the least any HTTP/1 engine of our own could do;
#                            # and examples/raw_work.rs ("raw-work"): that plus stickylb's
#                            # per-request work, with its routing and metrics
#   URING=1 bench/run.sh     # also examples/uring_floor.rs ("uring-floor"): raw-floor on io_uring
#                            # (tokio-uring), a turn's reads and writes in one kernel entry
#
# Needs: apt-get install haproxy nginx wrk (and util-linux's taskset, curl).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
ROUNDS=${ROUNDS:-5} DUR=${DUR:-10} CONNS=${CONNS:-50}
LOAD_CPU=${LOAD_CPU:-0} PROXY_CPU=${PROXY_CPU:-1} BP=${BASE_PORT:-28080}
P_A=$((BP + 1)) P_B=$((BP + 2)) P_HAPROXY=$((BP + 10)) P_NGINX=$((BP + 11)) P_OURS=$((BP + 12))
P_RELAY=$((BP + 9)) P_FLOOR=$((BP + 8)) P_RAW=$((BP + 7)) P_RAW_WORK=$((BP + 6)) P_URING=$((BP + 5))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-bench.XXXXXX) NAME=bench HINT="apt-get install haproxy nginx wrk"
NGINX_CPU=$PROXY_CPU
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need haproxy nginx wrk taskset curl
TARGETS=(haproxy nginx)
COMPARE=${COMPARE:-}
declare -A PORT=([haproxy]=$P_HAPROXY [nginx]=$P_NGINX) CK=() PID=()

# What HAProxy and nginx add with FORWARD=1: the client's address and scheme, as stickylb does.
FWD_HAPROXY="" FWD_NGINX=""
if [[ ${FORWARD:-0} == 1 ]]; then
    FWD_HAPROXY="  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Real-IP %[src]"
    FWD_NGINX="proxy_set_header X-Forwarded-For \$remote_addr; proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header X-Forwarded-Host \$http_host; proxy_set_header X-Real-IP \$remote_addr;"
fi

start() {
    upstream_run up-A "$P_A" A
    upstream_run up-B "$P_B" B
    haproxy_head http >"$W/haproxy.cfg"
    cat >>"$W/haproxy.cfg" <<CONF
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
backend be
  balance roundrobin
  cookie SRV insert indirect nocache
  option httpchk GET /healthz
  http-reuse always
  default-server check inter 1s fall 3 rise 2
$FWD_HAPROXY
  server A 127.0.0.1:$P_A cookie A
  server B 127.0.0.1:$P_B cookie B
CONF
    haproxy_run haproxy "$P_HAPROXY" "$PROXY_CPU"; PID[haproxy]=$HAPROXY
    # OSS nginx has no sticky cookie: a consistent hash on the cookie is its closest equivalent.
    nginx_run px-nginx "$P_NGINX" "upstream ups { hash \$cookie_SRV consistent;
        server 127.0.0.1:$P_A; server 127.0.0.1:$P_B; keepalive 64; keepalive_requests 1000000; }
      server { listen 127.0.0.1:$P_NGINX; location / { proxy_pass http://ups; proxy_http_version 1.1;
        proxy_set_header Connection \"\"; $FWD_NGINX } }"
    PID[nginx]=$(pgrep -P "$(<"$W/px-nginx/nginx.pid")")   # its one worker does the proxying
    stickylb_toml "$P_OURS" $'[health]\ninterval = "1s"\n' "$P_A" "$P_B" >"$W/template.toml"
    ours stickylb "$ROOT/target/release/stickylb" "$P_OURS"
    local n=0 spec
    for spec in $COMPARE; do
        n=$((n + 1)); ours "${spec%%=*}" "${spec#*=}" $((P_OURS + n))
    done
    if [[ ${FLOOR:-0} == 1 ]]; then
        ours hyper-floor "$ROOT/target/release/examples/hyper_floor" "$P_FLOOR"
    fi
    if [[ ${RAW:-0} == 1 ]]; then
        ours raw-floor "$ROOT/target/release/examples/raw_floor" "$P_RAW"
        ours raw-work "$ROOT/target/release/examples/raw_work" "$P_RAW_WORK"
    fi
    if [[ ${URING:-0} == 1 ]]; then
        ours uring-floor "$ROOT/target/release/examples/uring_floor" "$P_URING"
    fi
    if [[ ${CEILING:-0} == 1 ]]; then relay_run; fi
}

relay_run() {   # HAProxy relaying bytes to A: one receive and one send per message on each leg,
    # like every proxy here, and no parsing, headers or cookie at all
    haproxy_relay "$P_RELAY" "$P_A" >"$W/relay.cfg"
    haproxy_run relay "$P_RELAY" "$PROXY_CPU"; PID[tcp-relay]=$HAPROXY
    TARGETS+=(tcp-relay); PORT[tcp-relay]=$P_RELAY CK[tcp-relay]=none=0
}

ours() {   # label binary port
    sed "s/127.0.0.1:$P_OURS/127.0.0.1:$3/" "$W/template.toml" >"$W/ours-$1.toml"
    RUST_LOG=warn taskset -c "$PROXY_CPU" "$2" -c "$W/ours-$1.toml" >"$W/ours-$1.log" 2>&1 &
    PIDS+=($!); PID[$1]=$!; wait_port "$3"
    TARGETS+=("$1"); PORT[$1]=$3 CK[$1]=$(cookie_for "$3" stickylb)
}

cookie_for() {   # port name -> "name=value" from a response served by A
    local hdr
    for _ in $(seq 40); do
        hdr=$(curl -s -D - -o "$W/body" "http://127.0.0.1:$1/" | tr -d '\r')
        if [[ $(<"$W/body") == A ]]; then
            grep -i "^set-cookie: *$2=" <<<"$hdr" | head -1 | sed -E 's/^[^:]*: *([^;]*).*/\1/'; return 0
        fi
    done
    die "no cookie for A on port $1"
}
nginx_cookie() { for i in $(seq 50); do [[ $(curl -s -H "Cookie: SRV=s$i" "http://127.0.0.1:$P_NGINX/") == A ]] && { echo "SRV=s$i"; return 0; }; done; die "nginx: no key maps to A"; }
sticky() {   # port cookie: all 20 answers from A?
    [[ $(for _ in $(seq 20); do curl -s -H "Cookie: $2" "http://127.0.0.1:$1/"; done | sort -u) == A ]]
}

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }   # pid -> user and kernel clock ticks
switches() {   # pid -> voluntary (it slept and was woken) and involuntary (preempted) switches
    awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v, n}' "/proc/$1/status"
}

bench() {   # label port cookie -> a row of results.tsv (see printf)
    local out rps p99 n u0 k0 u1 k1 a0 b0 a1 b1 x ps0 ps1 w0 w1
    read -r u0 k0 < <(cpu_ticks "${PID[$1]}")
    read -r a0 b0 < <(cpu_ticks "$UP_A"); read -r x ps0 < <(switches "${PID[$1]}")
    read -r w0 x < <(switches "$UP_A")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -H "Cookie: $3" "http://127.0.0.1:$2/")
    read -r u1 k1 < <(cpu_ticks "${PID[$1]}")
    read -r a1 b1 < <(cpu_ticks "$UP_A"); read -r x ps1 < <(switches "${PID[$1]}")
    read -r w1 x < <(switches "$UP_A")
    printf '%s\n' "$out" >"$W/wrk-$1-$ROUND.txt"   # kept for the latency distribution
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/ requests in / {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' <<<"$out")
    grep -q "Non-2xx\|Socket errors" <<<"$out" && echo "bench: $1 reported errors: $(grep -E 'Non-2xx|Socket errors' <<<"$out")" >&2
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$rps" "$p99" "$n" "$((u1 - u0))" \
        "$((k1 - k0))" "$((a1 + b1 - a0 - b0))" "$((w1 - w0))" "$((ps1 - ps0))" >>"$W/results.tsv"
}

cd "$ROOT" && cargo build --release -q -p stickylb
if [[ ${FLOOR:-0} == 1 ]]; then cargo build --release -q -p stickylb --example hyper_floor; fi
if [[ ${RAW:-0} == 1 ]]; then cargo build --release -q -p stickylb --example raw_floor --example raw_work; fi
if [[ ${URING:-0} == 1 ]]; then cargo build --release -q -p stickylb --example uring_floor; fi
start
UP_A=$(pgrep -P "$(<"$W/up-A/nginx.pid")")   # upstream A's worker: every proxy pins to it
CK[haproxy]=$(cookie_for "$P_HAPROXY" SRV) CK[nginx]=$(nginx_cookie)
for t in "${TARGETS[@]}"; do sticky "${PORT[$t]}" "${CK[$t]}" || die "$t is not sticky with ${CK[$t]}"; done
sleep 2   # let the health checks of every proxy settle before measuring
N=${#TARGETS[@]}
for ROUND in $(seq "$ROUNDS"); do
    # Each round starts one target later: a slot in the order is not always the same target's
    # (the same build measured in two fixed slots differed by 6%).
    for ((i = 0; i < N; i++)); do
        t=${TARGETS[$(((ROUND - 1 + i) % N))]}
        bench "$t" "${PORT[$t]}" "${CK[$t]}"
    done
    echo "round $ROUND/$ROUNDS done" >&2
done

python3 - "$W/results.tsv" "$ROUNDS" "$DUR" "$CONNS" "$(getconf CLK_TCK)" <<'PY'
import statistics, sys
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
tick_us = 1e6 / int(sys.argv[5])
by = {}
for r, t, rps, p99, n, user, kernel, up_cpu, up_wakes, preempted in rows:
    n = int(n)
    by.setdefault(t, {})[int(r)] = (float(rps), float(p99), int(user) * tick_us / n, int(kernel) * tick_us / n,
                                    int(up_cpu) * tick_us / n, int(up_wakes) / n, int(preempted) / n)
print(f"\n{sys.argv[2]} interleaved rounds x {sys.argv[3]} s, wrk -t1 -c{sys.argv[4]}, keep-alive, sticky cookie to upstream A, one proxy thread\n")
print("| proxy | requests/s (median) | p99 ms (median) | rps ratio vs HAProxy | p99 ratio vs HAProxy | CPU us/request: user | kernel |")
print("|---|---|---|---|---|---|---|")
for t in by:
    rps = statistics.median(v[0] for v in by[t].values())
    p99 = statistics.median(v[1] for v in by[t].values())
    rr = statistics.median(by[t][r][0] / by["haproxy"][r][0] for r in by[t])
    pr = statistics.median(by[t][r][1] / by["haproxy"][r][1] for r in by[t])
    user = statistics.median(v[2] for v in by[t].values())
    kernel = statistics.median(v[3] for v in by[t].values())
    print(f"| {t} | {rps:,.0f} | {p99:.2f} | {rr:.2f}x | {pr:.2f}x | {user:.1f} | {kernel:.1f} |")
print("\nWhat each proxy costs upstream A, which shares its core (medians per request)\n")
print("| proxy | upstream A CPU us | upstream A wake-ups | proxy preempted |")
print("|---|---|---|---|")
for t in by:
    cpu, wakes, pre = (statistics.median(v[i] for v in by[t].values()) for i in (4, 5, 6))
    print(f"| {t} | {cpu:.1f} | {wakes:.3f} | {pre:.3f} |")
print("\nRequests/s round by round, as ratios (a build is judged against another by these)\n")
pairs = [(t, "haproxy") for t in by if t != "haproxy"]
pairs += [("stickylb", t) for t in by if t not in ("haproxy", "nginx", "stickylb", "tcp-relay")]
if "tcp-relay" in by:   # how near each build comes to the most any proxy reaches here
    pairs += [(t, "tcp-relay") for t in by if t not in ("haproxy", "nginx", "tcp-relay")]
for a, b in pairs:
    ratios = [by[a][r][0] / by[b][r][0] for r in sorted(by[a])]
    listed = " ".join(f"{x:.2f}" for x in ratios)
    print(f"- {a} / {b}: {listed} (median {statistics.median(ratios):.2f})")
PY
echo "wrk output of every round: $W/wrk-*.txt" >&2

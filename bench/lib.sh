# bench/lib.sh: what the bench scripts share; sourced, not run. Set NAME (for messages) and W (a
# work directory) first. Processes started in the background go into PIDS and are stopped on exit.
PIDS=()
die() { echo "$NAME: $*" >&2; exit 1; }
need() {   # tool... -> dies naming the first one missing
    for tool; do command -v "$tool" >/dev/null || die "$tool is missing${HINT:+: $HINT}"; done
}
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port() {   # port -> returns once an HTTP server answers there (30 s at most)
    for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done
    die "nothing answers on port $1 (logs in $W)"
}
nginx_run() {   # name port http-block -> one nginx worker (on core $NGINX_CPU if set), answering
    local d=$W/$1; mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<CONF
worker_processes 1; pid $d/nginx.pid; error_log $d/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp; uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
  $3 }
CONF
    ${NGINX_CPU:+taskset -c "$NGINX_CPU"} nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" -g 'daemon off;' &
    PIDS+=($!); wait_port "$2"
}
stickylb_toml() {   # port extra-toml upstream-port... -> on stdout, a one-worker stickylb config
    # listening on port, with the bench secret, the extra sections, and backends A, B, ... in order
    local port=$1 extra=$2 ids=(A B C D) i=0 up; shift 2
    printf '[runtime]\nworkers = 1\n[listener]\naddress = "127.0.0.1:%s"\n' "$port"
    printf '[affinity]\nsecret = "bench-secret-0123456789"\n%s' "$extra"
    for up; do
        printf '[[backends]]\nid = "%s"\naddress = "127.0.0.1:%s"\n' "${ids[i]}" "$up"; i=$((i + 1))
    done
}
stickylb_run() {   # binary port -> one stickylb serving $W/stickylb.toml on core 1 (log in $W),
    # its pid in OURS; returns once it answers on port
    RUST_LOG=warn taskset -c 1 "$1" -c "$W/stickylb.toml" >"$W/stickylb.log" 2>&1 &
    OURS=$!; PIDS+=("$OURS"); wait_port "$2"
}
stickylb_alone() {   # binary-or-empty port upstream-port -> stickylb_run in front of that one
    # upstream: the binary named, or a release build made now
    [[ -n $1 ]] || (cd "$ROOT" && cargo build --release -q -p stickylb)
    stickylb_toml "$2" "" "$3" >"$W/stickylb.toml"
    stickylb_run "${1:-$ROOT/target/release/stickylb}" "$2"
}
upstream_run() {   # name port text -> an nginx upstream answering 200 with text and a newline
    nginx_run "$1" "$2" "server { listen 127.0.0.1:$2; default_type text/plain;
      location / { return 200 \"$3\n\"; } }"
}
haproxy_head() {   # mode -> the global and defaults sections every HAProxy here shares: one thread
    printf 'global\n  nbthread 1\ndefaults\n  mode %s\n' "$1"
    printf '  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n'
}
haproxy_sticky() {   # port upstream-port -> on stdout, a one-thread HAProxy config: HTTP, a sticky
    # cookie SRV to that one upstream, connections to it reused
    haproxy_head http
    printf 'frontend fe\n  bind 127.0.0.1:%s\n  default_backend be\n' "$1"
    printf 'backend be\n  cookie SRV insert indirect nocache\n  http-reuse always\n'
    printf '  server A 127.0.0.1:%s cookie A\n' "$2"
}
haproxy_relay() {   # port upstream-port -> on stdout, a one-thread HAProxy relaying bytes to that
    # upstream in mode tcp: no parsing, headers or cookie, so about the most any proxy reaches
    haproxy_head tcp
    printf 'listen relay\n  bind 127.0.0.1:%s\n  server A 127.0.0.1:%s\n' "$1" "$2"
}
haproxy_run() {   # name port core -> HAProxy serving $W/name.cfg on that core (log in $W), its
    # pid in HAPROXY; returns once it answers on port
    taskset -c "$3" haproxy -db -f "$W/$1.cfg" >"$W/$1.log" 2>&1 &
    HAPROXY=$!; PIDS+=("$HAPROXY"); wait_port "$2"
}
stickylb_cookie() {   # port -> "stickylb=..." from the Set-Cookie of a first answer there
    curl -s -D - -o /dev/null "http://127.0.0.1:$1/" | tr -d '\r' |
        sed -n -E 's/^[Ss]et-[Cc]ookie: *(stickylb=[^;]*).*/\1/p'
}

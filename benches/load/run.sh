#!/usr/bin/env bash
# Load benchmark: the same load against the backend directly, portcullis, nginx and HAProxy.
#
# Builds portcullis (--release) and the fixed-rate generator (examples/fixed_rate.rs), installs
# nginx, HAProxy and wrk from Debian if missing, starts on loopback a fast backend (nginx answering
# a fixed 200) and the three proxies configured to do the same job (gen_fixtures.py, nginx.conf.in,
# haproxy.cfg.in), then for an allowed request, a 401 and a 403:
#   - throughput: wrk, keep-alive, CONNECTIONS connections, DURATION seconds per target;
#   - latency: fixed_rate at RATE req/s, LAT_ROUNDS rounds of LAT_DURATION seconds, the targets
#     taking turns within each round so that noise from other work on the machine falls on all of
#     them alike; the report gives the median of the rounds' percentiles.
# Each proxy's CPU time is read from /proc/PID/stat (utime+stime, workers included) before and
# after every run. All proxies run on core PROXY_CPU; wrk and the backend on core LOAD_CPU. For
# the latency runs (LATENCY_LAYOUT=shared, the default) the generator and the backend move to the
# proxy's core: on small VMs a wake-up across cores can cost milliseconds and would otherwise
# dominate every proxy's p99. Loopback only; every process is stopped by PID on exit.
# Prints Markdown and writes benches/results/latest.md (and latest.tsv, latency.tsv).
#
# Knobs (environment): DURATION (10), CONNECTIONS (50), RATE (5000), RATE_CONNECTIONS (32),
# LAT_ROUNDS (5), LAT_DURATION (4), PROXY_CPU (1), LOAD_CPU (0), NICE (-10),
# LATENCY_LAYOUT (shared|split), TARGETS ("portcullis nginx haproxy"), KEEP_WORK=1,
# PORTCULLIS_EXTRA_CONFIG (YAML appended to portcullis.yaml, e.g. an audit: block),
# PORTCULLIS_BIN (measure this binary instead of the fresh release build).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
RATE=${RATE:-5000}
RATE_CONNECTIONS=${RATE_CONNECTIONS:-32}
LAT_ROUNDS=${LAT_ROUNDS:-5}
LAT_DURATION=${LAT_DURATION:-4}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
LATENCY_LAYOUT=${LATENCY_LAYOUT:-shared}
TARGETS=${TARGETS:-portcullis nginx haproxy}
# Every process of the benchmark runs at this niceness, so builds of others sharing the machine
# disturb the measurement less (the same for every target).
NICE=${NICE:--10}
RESULTS_DIR=$ROOT/benches/results

log() { echo "run.sh: $*" >&2; }

install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

build() {
    log "building portcullis and the fixed-rate generator (release)"
    (cd "$ROOT" && cargo build --release --locked --bin portcullis --example fixed_rate >&2)
    # PORTCULLIS_BIN measures another build (e.g. the binary of an earlier commit, for before/after).
    PORTCULLIS=${PORTCULLIS_BIN:-$ROOT/target/release/portcullis}
    FIXED_RATE=$ROOT/target/release/examples/fixed_rate
}

WORK=$(mktemp -d /tmp/portcullis-load.XXXXXX)
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_ports() { # count
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

render() { # template output port
    sed -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$3|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" "$1" >"$2"
}

wait_http() { # url
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    log "nothing answers at $1"
    return 1
}

# utime + stime (seconds) of a process and its children (nginx workers), all threads.
cpu_seconds() { # pid
    local total=0 p ticks
    for p in "$1" $(pgrep -P "$1" || true); do
        ticks=$(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
        total=$((total + ticks))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}

# Re-pins the backend's master and workers (all threads) to a core.
move_backend() { # cpu
    local p
    for p in "${PID_OF[direct]}" $(pgrep -P "${PID_OF[direct]}" || true); do
        taskset -a -p -c "$1" "$p" >/dev/null
    done
}

declare -A PORT_OF PID_OF

start_backend() {
    render "$HERE/backend-nginx.conf.in" "$WORK/backend.conf" ""
    mkdir -p "$WORK/backend-tmp"
    nice -n "$NICE" taskset -c "$LOAD_CPU" nginx -p "$WORK" -e "$WORK/backend-startup.log" \
        -c "$WORK/backend.conf" -g 'daemon off;' &
    PIDS+=($!)
    PID_OF[direct]=$!
    PORT_OF[direct]=$BACKEND_PORT
    wait_http "http://127.0.0.1:$BACKEND_PORT/"
}

start_portcullis() { # port
    # A folder of its own: portcullis watches its config folders, and the benchmark's own output
    # files must not trigger reloads.
    mkdir -p "$WORK/portcullis"
    mv "$WORK/policy.yaml" "$WORK/keys.yaml" "$WORK/portcullis/"
    cat >"$WORK/portcullis/portcullis.yaml" <<YAML
listen: 127.0.0.1:$1
upstream: http://127.0.0.1:$BACKEND_PORT
admin: 127.0.0.1:$ADMIN_PORT
policy: policy.yaml
keys: keys.yaml
${PORTCULLIS_EXTRA_CONFIG:-}
YAML
    RUST_LOG=warn PORTCULLIS_LOG=warn nice -n "$NICE" taskset -c "$PROXY_CPU" \
        "$PORTCULLIS" run -c "$WORK/portcullis/portcullis.yaml" >"$WORK/portcullis.out" 2>"$WORK/portcullis.err" &
    PIDS+=($!)
    PID_OF[portcullis]=$!
    for _ in $(seq 100); do grep -q "listening proxy" "$WORK/portcullis.out" && return 0; sleep 0.1; done
    log "portcullis did not start:"
    cat "$WORK/portcullis.err" >&2
    return 1
}

start_nginx() { # port
    render "$HERE/nginx.conf.in" "$WORK/nginx.conf" "$1"
    cp "$HERE/nginx-check.conf" "$WORK/nginx-check.conf"
    nice -n "$NICE" taskset -c "$PROXY_CPU" nginx -p "$WORK" -e "$WORK/nginx-startup.log" \
        -c "$WORK/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
    PID_OF[nginx]=$!
    wait_http "http://127.0.0.1:$1/status"
}

start_haproxy() { # port
    render "$HERE/haproxy.cfg.in" "$WORK/haproxy.cfg" "$1"
    nice -n "$NICE" taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.err" &
    PIDS+=($!)
    PID_OF[haproxy]=$!
    wait_http "http://127.0.0.1:$1/status"
}

# The three requests: path, key and expected status of each case.
CASES=(allow 401 403)
case_path() { case $1 in allow | 401) echo /v1/datasets/ds_42 ;; 403) echo /v1/jobs/j_7 ;; esac; }
case_key() { case $1 in allow) echo "$ALLOW_KEY" ;; 401) echo "$UNKNOWN_KEY" ;; 403) echo "$DENY_KEY" ;; esac; }
case_status() { case $1 in allow) echo 200 ;; 401) echo 401 ;; 403) echo 403 ;; esac; }
case_url() { echo "http://127.0.0.1:${PORT_OF[$1]}$(case_path "$2")"; } # target case

# The targets that take a case: the backend only answers 200, so "direct" only runs "allow".
case_targets() { if [[ $1 == allow ]]; then echo direct $TARGETS; else echo $TARGETS; fi; }

# wrk's latency line ("50%  123.00us") in microseconds.
wrk_percentile() { # file percent
    awk -v p="$2%" '$1 == p {
        v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
        if (u == "ms") v *= 1000; else if (u == "s") v *= 1000000
        print v; exit }' "$1"
}

field() { sed -n "s/.*\b$2=\([^ ]*\).*/\1/p" "$1"; } # file key (fixed_rate output)

check_status() { # target case
    local status
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $(case_key "$2")" "$(case_url "$1" "$2")")
    if [[ $1 != direct && $status != $(case_status "$2") ]]; then
        log "$1 $2 answered $status, expected $(case_status "$2")"
        return 1
    fi
    echo "$status"
}

run_wrk() { # target case
    local target=$1 case=$2 status before after out=$WORK/wrk-$1-$2.txt
    status=$(check_status "$target" "$case")
    log "$target $case: wrk ${DURATION}s x $CONNECTIONS connections"
    before=$(cpu_seconds "${PID_OF[$target]}")
    nice -n "$NICE" taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
        -H "X-API-Key: $(case_key "$case")" "$(case_url "$target" "$case")" >"$out"
    after=$(cpu_seconds "${PID_OF[$target]}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$case" "$status" \
        "$(awk '/requests in/ { print $1; exit }' "$out")" \
        "$(awk '/^Requests\/sec:/ { print $2 }' "$out")" \
        "$(wrk_percentile "$out" 50)" "$(wrk_percentile "$out" 99)" \
        "$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')" >>"$WORK/wrk.tsv"
}

run_fixed_rate() { # target case round
    local target=$1 case=$2 before after out=$WORK/fixed-$1-$2-$3.txt
    local generator_cpu=$LOAD_CPU
    [[ $LATENCY_LAYOUT == shared ]] && generator_cpu=$PROXY_CPU
    before=$(cpu_seconds "${PID_OF[$target]}")
    nice -n "$NICE" taskset -c "$generator_cpu" "$FIXED_RATE" "$(case_url "$target" "$case")" \
        --rate "$RATE" --connections "$RATE_CONNECTIONS" --duration "$LAT_DURATION" --warmup 1 \
        -H "X-API-Key: $(case_key "$case")" >"$out"
    after=$(cpu_seconds "${PID_OF[$target]}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$case" "$3" \
        "$(field "$out" sent)" "$(field "$out" p50_us)" "$(field "$out" p99_us)" \
        "$(field "$out" p999_us)" "$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')" \
        "$(field "$out" late)" "$(field "$out" errors)" >>"$WORK/latency.tsv"
}

header() { # load average before
    echo "## Load benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)," \
        "$(free -h | awk '/^Mem:/ { print $2 }') RAM; load average before the run: $1, after: $(cut -d' ' -f1-3 /proc/loadavg);" \
        "portcullis $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src || echo ' + local changes')," \
        "$(nginx -v 2>&1 | cut -d/ -f2 | sed 's/^/nginx /'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')."
    echo
    echo "Command: \`benches/load/run.sh\`. Throughput: wrk -t1 -c$CONNECTIONS for $DURATION s per cell," \
        "proxies on core $PROXY_CPU, wrk and the backend on core $LOAD_CPU." \
        "Latency: examples/fixed_rate at $RATE req/s on $RATE_CONNECTIONS keep-alive connections," \
        "$LAT_ROUNDS rounds of $LAT_DURATION s (1 s warm-up each), targets taking turns; median of the rounds;" \
        "generator and backend $(if [[ $LATENCY_LAYOUT == shared ]]; then echo "on the proxies' core $PROXY_CPU"; else echo "on core $LOAD_CPU"; fi)."
    echo "CPU µs/req: the proxy's utime+stime (all threads, worker processes included) over the run" \
        "divided by the requests sent; for \"direct\" it is the backend's own. Latencies in µs."
}

main() {
    local load_before target case round
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    install_tools
    build
    python3 "$HERE/gen_fixtures.py" "$WORK" 10000
    # shellcheck disable=SC1091
    source "$WORK/load-keys.env"
    read -r BACKEND_PORT ADMIN_PORT PORT_OF[portcullis] PORT_OF[nginx] PORT_OF[haproxy] <<<"$(free_ports 5)"
    start_backend
    for target in $TARGETS; do
        log "starting $target"
        "start_$target" "${PORT_OF[$target]}"
    done
    for target in direct $TARGETS; do
        nice -n "$NICE" taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d2s \
            -H "X-API-Key: $ALLOW_KEY" "$(case_url "$target" allow)" >/dev/null
    done

    printf 'target\tcase\tstatus\twrk_requests\twrk_rps\twrk_p50_us\twrk_p99_us\twrk_cpu_s\n' >"$WORK/wrk.tsv"
    for case in "${CASES[@]}"; do
        for target in $(case_targets "$case"); do run_wrk "$target" "$case"; done
    done

    printf 'target\tcase\tround\tsent\tp50_us\tp99_us\tp999_us\tcpu_s\tlate\terrors\n' >"$WORK/latency.tsv"
    [[ $LATENCY_LAYOUT == shared ]] && move_backend "$PROXY_CPU"
    for case in "${CASES[@]}"; do
        log "$case: fixed rate $RATE/s, $LAT_ROUNDS rounds of ${LAT_DURATION}s per target"
        for round in $(seq "$LAT_ROUNDS"); do
            for target in $(case_targets "$case"); do run_fixed_rate "$target" "$case" "$round"; done
        done
    done
    move_backend "$LOAD_CPU"

    header "$load_before" >"$WORK/header.md"
    mkdir -p "$RESULTS_DIR"
    cp "$WORK/wrk.tsv" "$RESULTS_DIR/latest.tsv"
    cp "$WORK/latency.tsv" "$RESULTS_DIR/latency.tsv"
    python3 "$HERE/report.py" "$WORK/wrk.tsv" "$WORK/latency.tsv" "$WORK/header.md" |
        tee "$RESULTS_DIR/latest.md"
}

main "$@"

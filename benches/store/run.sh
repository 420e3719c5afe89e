#!/usr/bin/env bash
# Benchmarks of the shared key store on PostgreSQL (issue 13). Starts its own throwaway
# PostgreSQL 15 (initdb into a temp folder as the postgres user, a free loopback port,
# pg_stat_statements preloaded), runs the steps and prints Markdown; stops everything it started
# by PID on exit. Needs root (runuser to postgres) and Debian's postgresql-15.
#
#   bash benches/store/run.sh                      # every step, ~17 min + build
#   STEPS="propagation flush" bash benches/store/run.sh
#
# Knobs (environment):
#   STEPS         propagation import startup flush sim (default: all, in that order; startup and
#                 flush need import)
#   PROP_N        changes per propagation run (200)
#   KEYS_FILE     the 1M-key file (/tmp/keys-1m.yaml; written by load_keys when missing)
#   STARTUP_RUNS  starts per case (3); STARTUP_IDLE idle CPU window after the first start (15s)
#   IMPORT_CHUNK  keys per `keys import` (20000: one import must finish within the store's 10 s
#                 operation timeout); IMPORT_ONESHOT=1 first tries the whole file in one command
#   FLUSH_KEYS    keys in the big flush (10000)
#   SIM_CLIENTS   simulated sidecars per run ("200 500"); SIM_DURATION (60s; SIM_EXTRA_DURATION,
#                 30s, for the variants at the largest N below); SIM_KEYS keys in
#                 the simulation database (10000); SIM_POLL_ONLY=1 adds a poll-only run at the
#                 largest N; SIM_PREPARED=1 one more there with the poll and flush statements
#                 prepared once per connection, and one with unnamed statements (query_typed)
#   SIM_SLOW_POLL one more run at the largest N with this poll_interval (5s; empty: none)
#   PGBOUNCER     a pgbouncer binary (default: the one on PATH, if any; PGBOUNCER_LIBS for its
#                 LD_LIBRARY_PATH): adds poll-only runs through it in transaction mode, pool
#                 PGB_POOL (20), with the code's statements and with unnamed ones
#   FSYNC         on (default, durable commits as in production) or off (as the tests run)
#   BUILD=0       skip the cargo builds; PORTCULLIS, STORE_BENCH, LOAD_KEYS: other binaries (say,
#                 copies, so a build elsewhere cannot swap them during a run)
#   KEEP_WORK=1   keep the work folder (PostgreSQL log, proxy logs)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
STEPS=${STEPS:-"propagation import startup flush sim"}
PROP_N=${PROP_N:-200}
KEYS_FILE=${KEYS_FILE:-/tmp/keys-1m.yaml}
STARTUP_RUNS=${STARTUP_RUNS:-3}
STARTUP_IDLE=${STARTUP_IDLE:-15s}
FLUSH_KEYS=${FLUSH_KEYS:-10000}
SIM_CLIENTS=${SIM_CLIENTS:-"200 500"}
SIM_DURATION=${SIM_DURATION:-60s}
SIM_EXTRA_DURATION=${SIM_EXTRA_DURATION:-30s}
SIM_KEYS=${SIM_KEYS:-10000}
SIM_POLL_ONLY=${SIM_POLL_ONLY:-1}
SIM_PREPARED=${SIM_PREPARED:-1}
SIM_SLOW_POLL=${SIM_SLOW_POLL-5s}
PGBOUNCER=${PGBOUNCER-$(command -v pgbouncer || true)}
PGB_POOL=${PGB_POOL:-20}
FSYNC=${FSYNC:-on}
IMPORT_CHUNK=${IMPORT_CHUNK:-20000}
IMPORT_ONESHOT=${IMPORT_ONESHOT:-1}
BIN=${PORTCULLIS:-$ROOT/target/release/portcullis}
BENCH=${STORE_BENCH:-$ROOT/target/release/examples/store_bench}
LOAD_KEYS=${LOAD_KEYS:-$ROOT/target/release/examples/load_keys}

[ -x "$PGBIN/postgres" ] || { echo "PostgreSQL 15 is not installed (apt-get install postgresql-15)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (the cluster runs as the postgres user)" >&2; exit 1; }

if [ "${BUILD:-1}" = 1 ]; then
  # One build at a time (2 cores).
  cargo build --release >&2
  cargo build --release --example store_bench >&2
  cargo build --release --example load_keys >&2
fi

WORK=$(mktemp -d /tmp/portcullis-store-bench.XXXXXX)
chown postgres:postgres "$WORK"
PG_PID=
PGB_PID=
cleanup() {
  if [ -n "$PGB_PID" ] && kill -0 "$PGB_PID" 2>/dev/null; then
    kill -TERM "$PGB_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$PGB_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -z "$PG_PID" ] && [ -f "$WORK/data/postmaster.pid" ]; then
    PG_PID=$(head -1 "$WORK/data/postmaster.pid")
  fi
  if [ -n "$PG_PID" ] && kill -0 "$PG_PID" 2>/dev/null; then
    kill -INT "$PG_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PG_PID" 2>/dev/null || true
  fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work folder kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
PASSWORD=bench-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
as_pg() { runuser -u postgres -- "$@"; }
psql_su() { as_pg "$PGBIN/psql" -h "$WORK" -p "$PORT" -U postgres -d "${DB:-postgres}" -v ON_ERROR_STOP=1 -At -c "$1"; }

as_pg "$PGBIN/initdb" -D "$WORK/data" --auth-local=trust --auth-host=scram-sha-256 \
  --username=postgres --encoding=UTF8 --no-sync >/dev/null
# Everything else is PostgreSQL 15's default (shared_buffers 128MB, autovacuum on).
as_pg "$PGBIN/postgres" -D "$WORK/data" -p "$PORT" -k "$WORK" \
  -c listen_addresses=127.0.0.1 -c max_connections=1200 -c "fsync=$FSYNC" \
  -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
  -c logging_collector=off >"$WORK/postgres.log" 2>&1 &
for _ in $(seq 1 300); do
  "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q && break
  sleep 0.1
done
"$PGBIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q || { cat "$WORK/postgres.log" >&2; exit 1; }
PG_PID=$(head -1 "$WORK/data/postmaster.pid")
psql_su "CREATE ROLE portcullis LOGIN PASSWORD '$PASSWORD'" >/dev/null
psql_su "ALTER ROLE postgres PASSWORD '$PASSWORD'" >/dev/null
for db in portcullis portcullis_sim; do
  psql_su "CREATE DATABASE $db OWNER portcullis" >/dev/null
  DB=$db psql_su "CREATE EXTENSION pg_stat_statements" >/dev/null
done
URL="postgres://portcullis:$PASSWORD@127.0.0.1:$PORT/portcullis?sslmode=disable"
MONITOR="postgres://postgres:$PASSWORD@127.0.0.1:$PORT/portcullis?sslmode=disable"
SIM_URL="postgres://portcullis:$PASSWORD@127.0.0.1:$PORT/portcullis_sim?sslmode=disable"
SIM_MONITOR="postgres://postgres:$PASSWORD@127.0.0.1:$PORT/portcullis_sim?sslmode=disable"

has_step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

echo "# Shared key store benchmarks"
echo
echo "$(date -u +%Y-%m-%dT%H:%MZ), portcullis $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (src/ modified)'),"\
  "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') (fsync=$FSYNC, max_connections=1200, other settings default),"\
  "$(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
echo

if has_step propagation; then
  echo "## Propagation of one change across two proxies"
  echo
  echo "Key made on A (key API, or \`portcullis keys create\`), then B asked with it every ~1 ms until 200; ms from the create being sent."
  echo
  echo "| feed | made via | changes | p50 | p90 | p99 | max | the write itself p50 / p99 |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  "$BENCH" propagation --bin "$BIN" --url "$URL" --n "$PROP_N" --notify true --via api
  "$BENCH" propagation --bin "$BIN" --url "$URL" --n "$PROP_N" --notify true --via cli
  "$BENCH" propagation --bin "$BIN" --url "$URL" --n "$PROP_N" --notify false --poll 1s --via api
  echo
fi

if has_step import; then
  [ -f "$KEYS_FILE" ] || "$LOAD_KEYS" write "$KEYS_FILE" >&2
  total=$(grep -c '^  - id:' "$KEYS_FILE")
  echo "## Import of $total keys"
  echo
  if [ "$IMPORT_ONESHOT" = 1 ]; then
    # The whole file in one command, as a user would try first.
    start=$(date +%s.%N)
    if "$BIN" keys import --keys "$URL" --from "$KEYS_FILE" >"$WORK/import.out" 2>"$WORK/import.err"; then
      outcome="$(tail -1 "$WORK/import.out")"
    else
      outcome="failed: $(grep -v NOTICE "$WORK/import.err" | tail -1)"
    fi
    echo "- \`portcullis keys import --keys URL --from $(basename "$KEYS_FILE")\` in one go: $(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)") s, $outcome"
  fi
  # In pieces of IMPORT_CHUNK keys, one \`keys import\` each.
  mkdir -p "$WORK/parts"
  awk -v n="$IMPORT_CHUNK" -v dir="$WORK/parts" 'NR<=2{hdr=hdr $0 "\n"; next}
    /^  - id:/{if(c%n==0){if(out)close(out); out=sprintf("%s/part-%05d.yaml",dir,c/n); printf "%s", hdr > out} c++}
    {print > out}' "$KEYS_FILE"
  start=$(date +%s.%N)
  slowest=0
  for part in "$WORK"/parts/part-*.yaml; do
    t0=$(date +%s.%N)
    "$BIN" keys import --keys "$URL" --from "$part" >/dev/null 2>"$WORK/import.err" \
      || { grep -v NOTICE "$WORK/import.err" >&2; exit 1; }
    slowest=$(echo "t=$(date +%s.%N) - $t0; if (t > $slowest) t else $slowest" | bc)
  done
  elapsed=$(echo "$(date +%s.%N) - $start" | bc)
  parts=$(ls "$WORK"/parts | wc -l)
  rm -rf "$WORK/parts"
  echo "- in $parts pieces of $IMPORT_CHUNK keys (one \`keys import\` each): $(printf '%.1f' "$elapsed") s in all, $(printf '%.0f' "$(echo "$total / $elapsed" | bc -l)") keys/s, slowest piece $(printf '%.2f' "$slowest") s"
  echo "- table: $(DB=portcullis psql_su "SELECT count(*) || ' rows, ' || pg_size_pretty(pg_total_relation_size('portcullis.keys')) || ' with indexes' FROM portcullis.keys")"
  echo
fi

if has_step startup; then
  echo "## Start with 1,000,000 keys"
  echo
  echo "From spawning \`portcullis run\` to \`/readyz\` 200; peak RSS (VmHWM) and RSS at that moment; the proxy's CPU and PostgreSQL's CPU (all its processes) over the start."
  echo
  echo "| keys | run | listening | ready | peak RSS | RSS | proxy CPU | PostgreSQL CPU | idle (first run) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  "$BENCH" startup --bin "$BIN" --keys "$URL" --label "postgres://" --runs "$STARTUP_RUNS" --idle "$STARTUP_IDLE" --pg-pid "$PG_PID"
  "$BENCH" startup --bin "$BIN" --keys "$URL" --label "postgres:// + key_cache" --key-cache true --runs "$STARTUP_RUNS" --pg-pid "$PG_PID"
  "$BENCH" startup --bin "$BIN" --keys "$KEYS_FILE" --label "file $(basename "$KEYS_FILE")" --runs "$STARTUP_RUNS" --idle "$STARTUP_IDLE"
  echo
  echo "The database half alone (\`store_bench fetch\`: the load's query streamed and decoded as the proxy does, nothing kept):"
  echo
  echo "| what | run | rows | wall | peak RSS | text |"
  echo "|---|---:|---:|---:|---:|---:|"
  "$BENCH" fetch --url "$URL" --runs "$STARTUP_RUNS"
  echo
fi

if has_step flush; then
  echo "## One usage flush"
  echo
  "$BENCH" flush --url "$URL" --monitor-url "$MONITOR" --keys "$FLUSH_KEYS" --rounds 20 --fillfactor 70
  echo
fi

if has_step sim; then
  "$LOAD_KEYS" write "$WORK/keys-sim.yaml" "$SIM_KEYS" >&2
  "$BIN" keys import --keys "$SIM_URL" --from "$WORK/keys-sim.yaml" >&2
  # What autovacuum does within a minute of the import; until then every delta poll is a
  # sequential scan (see benches/README.md).
  DB=portcullis_sim psql_su "ANALYZE portcullis.keys" >/dev/null
  echo "## Simulated sidecars"
  echo
  echo "Each sidecar: connect + migrate + full load of $SIM_KEYS keys (a connection, then closed), a LISTEN connection, and one connection for a delta poll every 1 s and a usage flush of 100 keys every 10 s (SQL from src/store/postgres.rs, prepared on every call as tokio-postgres's \`query(&str)\` does); one key change every 5 s (advisory lock, nextval, NOTIFY). $SIM_DURATION measured after a 5 s warm-up ($SIM_EXTRA_DURATION for the variants)."
  echo
  echo "| sidecars | feed | connections | PostgreSQL cores | m-cores per sidecar | statements/s | commits/s | rows written/s | polls/s | flushes/s | poll p50 / p99 ms | change → seen p50 / p99 ms | errors | start of all (ramp, PostgreSQL CPU) |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  largest=0
  for n in $SIM_CLIENTS; do
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    "$BENCH" sim --url "$SIM_URL" --monitor-url "$SIM_MONITOR" --pg-pid "$PG_PID" --clients "$n" --duration "$SIM_DURATION" 2>>"$WORK/sim.err"
    [ "$n" -gt "$largest" ] && largest=$n
    sleep 3
  done
  if [ "$SIM_POLL_ONLY" = 1 ]; then
    "$BENCH" sim --url "$SIM_URL" --monitor-url "$SIM_MONITOR" --pg-pid "$PG_PID" --clients "$largest" --duration "$SIM_EXTRA_DURATION" --notify false 2>>"$WORK/sim.err"
    sleep 3
  fi
  if [ -n "$SIM_SLOW_POLL" ]; then
    "$BENCH" sim --url "$SIM_URL" --monitor-url "$SIM_MONITOR" --pg-pid "$PG_PID" --clients "$largest" --duration "$SIM_EXTRA_DURATION" --poll "$SIM_SLOW_POLL" 2>>"$WORK/sim.err"
    sleep 3
  fi
  if [ "$SIM_PREPARED" = 1 ]; then
    for how in prepared typed; do
      "$BENCH" sim --url "$SIM_URL" --monitor-url "$SIM_MONITOR" --pg-pid "$PG_PID" --clients "$largest" --duration "$SIM_EXTRA_DURATION" --statements "$how" 2>>"$WORK/sim.err"
      sleep 3
    done
  fi
  if [ -n "$PGBOUNCER" ]; then
    # PgBouncer in transaction mode in front of the simulation database, poll only.
    PGB_PORT=$(free_port)
    mkdir -p "$WORK/pgbouncer"
    printf '"portcullis" "%s"\n' "$PASSWORD" >"$WORK/pgbouncer/users.txt"
    printf '%s\n' "[databases]" "portcullis_sim = host=127.0.0.1 port=$PORT dbname=portcullis_sim" \
      "[pgbouncer]" "listen_addr = 127.0.0.1" "listen_port = $PGB_PORT" "unix_socket_dir =" \
      "auth_type = scram-sha-256" "auth_file = $WORK/pgbouncer/users.txt" "pool_mode = transaction" \
      "default_pool_size = $PGB_POOL" "max_client_conn = 5000" \
      "logfile = $WORK/pgbouncer/pgbouncer.log" "pidfile = $WORK/pgbouncer/pgbouncer.pid" \
      >"$WORK/pgbouncer/pgbouncer.ini"
    chown -R postgres:postgres "$WORK/pgbouncer"
    runuser -u postgres -- env LD_LIBRARY_PATH="${PGBOUNCER_LIBS:-}" "$PGBOUNCER" -d "$WORK/pgbouncer/pgbouncer.ini"
    sleep 1
    PGB_PID=$(cat "$WORK/pgbouncer/pgbouncer.pid")
    PGB_VERSION=$(LD_LIBRARY_PATH="${PGBOUNCER_LIBS:-}" "$PGBOUNCER" --version 2>/dev/null | head -1 | awk '{print $2}')
    PGB_URL="postgres://portcullis:$PASSWORD@127.0.0.1:$PGB_PORT/portcullis_sim?sslmode=disable"
    for how in text typed; do
      "$BENCH" sim --url "$PGB_URL" --monitor-url "$SIM_MONITOR" --pg-pid "$PG_PID" --pooler-pid "$PGB_PID" --clients "$largest" --duration "$SIM_EXTRA_DURATION" --notify false --statements "$how" 2>>"$WORK/sim.err" \
        | sed "s/^| \([0-9]*\) | /| \1 | PgBouncer $PGB_VERSION (transaction, pool $PGB_POOL), /"
      sleep 3
    done
  fi
  echo
  echo '```'
  grep -v '^  ' "$WORK/sim.err" || true
  echo
  echo "statements per second by text, per run (pg_stat_statements):"
  grep '^  ' "$WORK/sim.err" || true
  echo '```'
  echo
fi
echo "Load average after: $(cut -d' ' -f1-3 /proc/loadavg)."

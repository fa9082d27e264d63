#!/usr/bin/env bash
# Services the test suite needs beyond Python packages: PostgreSQL and an MLflow tracking server on it,
# both bound to 127.0.0.1, for tests/test_mlflow_server.py.
#
#   bash .ci/services.sh          start (idempotent: whatever already runs is reused)
#   bash .ci/services.sh stop     stop both
#   bash .ci/services.sh status   exit 0 when both answer
#
# Addresses are fixed so the tests need no environment from this script:
#   PostgreSQL  127.0.0.1:${HGVAE_CI_PG_PORT:-55432}, role/database "mlflow", trust auth (loopback only)
#   MLflow      http://127.0.0.1:${HGVAE_CI_MLFLOW_PORT:-5055}, artifacts proxied (--serve-artifacts) from
#               $STATE/mlartifacts
# State lives in ${HGVAE_CI_STATE:-/tmp/hgvae-ci} (data directory, logs, pid file).
# MLflow runs from ${HGVAE_CI_PYTHON:-.venv/bin/python}; with the default, `make venv` builds .venv first
# (the same venv `make test` then reuses), so psycopg2 from the dev extra is there.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${HGVAE_CI_STATE:-/tmp/hgvae-ci}
PG_PORT=${HGVAE_CI_PG_PORT:-55432}
MLFLOW_PORT=${HGVAE_CI_MLFLOW_PORT:-5055}
PGDATA="$STATE/pgdata"
PG_BIN=${HGVAE_CI_PG_BIN:-$(dirname "$(readlink -f "$(command -v pg_ctl || echo /usr/lib/postgresql/15/bin/pg_ctl)")")}
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
DB_URI="postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow"

log() { echo "[services] $*"; }

# PostgreSQL refuses to run as root: run it as the image's `postgres` user, created when missing.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_up() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }
mlflow_up() { curl -fsS -m 2 "$MLFLOW_URL/health" >/dev/null 2>&1; }

# The server runs in its own session (setsid; session id = the pid we saved) with uvicorn and job
# runner children. The pid file may be stale (machine reused after a hard stop): only a session that
# still holds an mlflow/uvicorn process is ours to stop.
mlflow_session() {
    local sid
    sid=$(cat "$STATE/mlflow.pid" 2>/dev/null) || return 1
    pgrep -s "$sid" -f "mlflow|uvicorn" >/dev/null || return 1
    echo "$sid"
}

stop() {
    local sid
    if sid=$(mlflow_session); then
        kill -TERM -- "-$sid" 2>/dev/null || true
        for _ in $(seq 50); do pgrep -s "$sid" >/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$sid" 2>/dev/null || true  # whatever ignored SIGTERM for 5 s
        log "mlflow stopped"
    fi
    rm -f "$STATE/mlflow.pid"
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null && log "postgres stopped"
    fi
}

start_postgres() {
    if pg_up; then log "postgres already up on 127.0.0.1:$PG_PORT"; return; fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$STATE"
    # the state dir must be traversable by the postgres user
    chmod 755 "$STATE"
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        mkdir -p "$PGDATA"
        [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA"
        chmod 700 "$PGDATA"
        as_pg "$PG_BIN/initdb" -D "$PGDATA" -U mlflow --auth=trust -E UTF8 --no-instructions >/dev/null
        log "initialised $PGDATA"
    fi
    touch "$STATE/postgres.log"
    [ "$(id -u)" = 0 ] && chown postgres: "$STATE/postgres.log"
    # A throwaway CI database: durability off for speed; sockets only in the data dir (no /var/run needed).
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$STATE/postgres.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $PG_PORT -k $PGDATA -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null
    log "postgres started on 127.0.0.1:$PG_PORT"
}

create_db() {
    if ! psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1; then
        psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -qc "CREATE DATABASE mlflow" >/dev/null
        log "created database mlflow"
    fi
}

python_bin() {
    if [ -n "${HGVAE_CI_PYTHON:-}" ]; then echo "$HGVAE_CI_PYTHON"; return; fi
    make -s venv >&2
    echo "$PWD/.venv/bin/python"
}

start_mlflow() {
    if mlflow_up; then log "mlflow already up at $MLFLOW_URL"; return; fi
    local py
    py=$(python_bin)
    mkdir -p "$STATE/mlartifacts"
    # A database left by an older MLflow (a reused machine) needs its schema migrated first; a no-op otherwise.
    "$py" -m mlflow db upgrade "$DB_URI" >"$STATE/mlflow-upgrade.log" 2>&1 \
        || { log "mlflow db upgrade failed:"; tail -n 20 "$STATE/mlflow-upgrade.log" >&2; exit 1; }
    # setsid + closed stdio: the server must not hold CI's output pipe open after this script exits.
    # MLflow's background job runner (huey consumers for GenAI jobs) is not needed here: 7 fewer processes.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$py" -m mlflow server \
        --backend-store-uri "$DB_URI" \
        --artifacts-destination "$STATE/mlartifacts" --serve-artifacts \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        </dev/null >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
    # First start on an empty database runs MLflow's schema migrations: allow a couple of minutes.
    for _ in $(seq 240); do
        if mlflow_up; then log "mlflow up at $MLFLOW_URL (backend $DB_URI)"; return; fi
        if ! kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null; then
            log "mlflow server exited; last log lines:"; tail -n 30 "$STATE/mlflow.log" >&2; exit 1
        fi
        sleep 0.5
    done
    log "mlflow did not answer within 120 s; last log lines:"; tail -n 30 "$STATE/mlflow.log" >&2
    exit 1
}

case "${1:-start}" in
    start)
        start_postgres
        create_db
        start_mlflow
        ;;
    stop) stop ;;
    status) pg_up && mlflow_up ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac

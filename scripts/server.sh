#!/usr/bin/env bash
# The Prefect server a team shares: Prefect's API and UI on PostgreSQL (SQLite, what `pkt ui` and the
# temporary servers use, logs "database is locked" once a worker and a demo write at once).
#
#   bash scripts/server.sh start     # initdb (first time), PostgreSQL, the database, then Prefect's server
#   bash scripts/server.sh status    # exit 0 when both run
#   bash scripts/server.sh stop      # Prefect's server, then PostgreSQL (fast shutdown)
#
# Settings (environment):
#   PKT_SERVER_DIR   where the cluster, its password, logs and pid files live (default: ./.pkt/server)
#   PKT_SERVER_HOST  Prefect's address (default 127.0.0.1; see README before exposing it)
#   PKT_SERVER_PORT  Prefect's port (default 4200)
#   PKT_PG_BIN       PostgreSQL's programs (default: the newest /usr/lib/postgresql/*/bin, else PATH)
#   PKT_PG_USER      the user PostgreSQL runs as when this script runs as root (default postgres):
#                    initdb and postgres refuse to run as root
#   PKT_PYTHON       the Python with pkt (and so Prefect and asyncpg) installed (default: .venv/bin/python
#                    of this checkout, else python3)
#   PKT_SERVER_TIMEOUT  seconds to wait for Prefect's server to answer (default 300: a busy machine is slow)
# PostgreSQL listens on 127.0.0.1 only, on a free port, with a generated password (PKT_SERVER_DIR/pg.password).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$(realpath -m "${PKT_SERVER_DIR:-.pkt/server}")"
HOST="${PKT_SERVER_HOST:-127.0.0.1}"
PORT="${PKT_SERVER_PORT:-4200}"
TIMEOUT="${PKT_SERVER_TIMEOUT:-300}"
PGDATA="$DIR/pgdata"
DB=prefect
DBUSER=pkt
if [ -n "${PKT_PYTHON:-}" ]; then PY="$PKT_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

die() { echo "scripts/server.sh: error: $*" >&2; exit 2; }

pg_bin() {
  if [ -n "${PKT_PG_BIN:-}" ]; then echo "$PKT_PG_BIN"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
  die "no PostgreSQL programs (initdb, pg_ctl) found; install PostgreSQL (Debian: apt-get install postgresql) or set PKT_PG_BIN to their directory"
}

# initdb and postgres refuse root: as root they run as PKT_PG_USER, who must own the cluster's folder
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${PKT_PG_USER:-postgres}" -- "$@"; else "$@"; fi
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

pg_running() { [ -f "$PGDATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

api_url() { echo "http://$HOST:$PORT/api"; }

healthy() {
  "$PY" -c 'import sys, httpx; sys.exit(httpx.get(sys.argv[1] + "/health", timeout=5).status_code != 200)' \
    "$(cat "$DIR/prefect.url" 2>/dev/null || api_url)" 2>/dev/null
}

init_cluster() {
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  umask 077
  "$PY" -c 'import secrets; print(secrets.token_hex(16))' > "$DIR/pg.password"
  mkdir -p "$PGDATA"
  local pwfile="$DIR/.pwfile"  # initdb reads the password here (pgdata must be empty)
  cp "$DIR/pg.password" "$pwfile"
  if [ "$(id -u)" = 0 ]; then
    local user="${PKT_PG_USER:-postgres}"
    chown -R "$user" "$PGDATA" "$pwfile"
    chmod 711 "$DIR"  # the cluster's owner passes through to pgdata; the password file stays root's
    as_pg test -w "$PGDATA" || { rm -rf "$PGDATA"; die "$DIR: user $user (PostgreSQL refuses to run as root) cannot reach it, since a folder above it is private; set PKT_SERVER_DIR to a folder $user can reach, or run as another user"; }
  fi
  as_pg "$BIN/initdb" -D "$PGDATA" -U "$DBUSER" --pwfile="$pwfile" --auth-host=scram-sha-256 \
    --auth-local=scram-sha-256 -E UTF8 >"$DIR/initdb.log" 2>&1 \
    || { rm -f "$pwfile"; die "initdb failed (see $DIR/initdb.log)"; }
  rm -f "$pwfile"
}

start() {
  if alive "$DIR/prefect.pid" && healthy; then
    echo "already running; point runs and workers at it with:"
    echo "  export PREFECT_API_URL=$(cat "$DIR/prefect.url")"
    return 0
  fi
  [ -f "$PGDATA/PG_VERSION" ] || init_cluster
  local pgport password
  if ! pg_running; then
    pgport="$(free_port)"
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w -t 120 \
      -o "-c listen_addresses=127.0.0.1 -p $pgport -k $PGDATA" start >/dev/null \
      || die "PostgreSQL did not start (see $PGDATA/postgres.log)"
    echo "$pgport" > "$DIR/pg.port"
  fi
  pgport="$(cat "$DIR/pg.port")"
  password="$(cat "$DIR/pg.password")"
  export PGPASSWORD="$password"
  if [ -z "$("$BIN/psql" -h 127.0.0.1 -p "$pgport" -U "$DBUSER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
    "$BIN/createdb" -h 127.0.0.1 -p "$pgport" -U "$DBUSER" "$DB"
  fi
  unset PGPASSWORD
  if ! "$PY" -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2])))' "$HOST" "$PORT" 2>/dev/null; then
    die "port $PORT on $HOST is taken (a \`pkt ui\` or another server?); stop it, or set PKT_SERVER_PORT to a free port"
  fi
  echo "$(api_url)" > "$DIR/prefect.url"
  # its own session (setsid), so that `stop` ends Prefect's server and every process it started at once
  PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$DBUSER:$password@127.0.0.1:$pgport/$DB" \
  PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL="$(api_url)" \
    setsid "$PY" -m prefect server start --host "$HOST" --port "$PORT" </dev/null >>"$DIR/prefect.log" 2>&1 &
  echo $! > "$DIR/prefect.pid"
  local deadline=$((SECONDS + TIMEOUT))
  until healthy; do
    alive "$DIR/prefect.pid" || die "Prefect's server exited while starting (see $DIR/prefect.log)"
    [ $SECONDS -lt $deadline ] || { stop_prefect; die "Prefect's server did not answer within $TIMEOUT s (see $DIR/prefect.log); set PKT_SERVER_TIMEOUT higher on a busy machine"; }
    sleep 1
  done
  echo "Prefect server on PostgreSQL (database $DB on 127.0.0.1:$pgport, cluster $PGDATA): UI on http://$HOST:$PORT"
  echo "point runs and workers at it with:"
  echo "  export PREFECT_API_URL=$(api_url)"
}

stop_prefect() {
  alive "$DIR/prefect.pid" || { rm -f "$DIR/prefect.pid"; return 0; }
  local pid
  pid="$(cat "$DIR/prefect.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/prefect.pid"
}

stop() {
  stop_prefect
  if pg_running; then as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; fi
  echo "stopped (the database stays in $PGDATA; \`start\` serves it again)"
}

status() {
  local code=0
  if alive "$DIR/prefect.pid" && healthy; then echo "prefect: running, PREFECT_API_URL=$(cat "$DIR/prefect.url")"
  else echo "prefect: stopped"; code=3; fi
  if pg_running; then echo "postgresql: running on 127.0.0.1:$(cat "$DIR/pg.port"), cluster $PGDATA"
  else echo "postgresql: stopped"; code=3; fi
  return $code
}

BIN="$(pg_bin)"
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash scripts/server.sh start|stop|status (settings: see the top of this file)" >&2; exit 2 ;;
esac

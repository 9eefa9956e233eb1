#!/usr/bin/env bash
# Runs Debian's PostgreSQL server as a cluster of the project's own, in the state folder, on its own port.
# The server is the one whose `postgres` comes first on PATH, else the newest /usr/lib/postgresql/*/bin.
# When that PostgreSQL has the TimescaleDB library, the server starts with
# shared_preload_libraries=timescaledb (without it the extension cannot be used) and the database gets the
# extension, in schema public: TimescaleDB mode. Otherwise plain PostgreSQL.
#   postgres.sh start    install the server if missing, initdb once, start, create role and database,
#                        try TimescaleDB, write the DSN to <state>/postgres/dsn
#   postgres.sh stop     fast shutdown (clean: checkpoints and closes sessions)
#   postgres.sh status   "up <address> <mode>" or "down <address>"; exit 0 when up
#   postgres.sh dsn      print the libpq URL
# Environment: AIMA_STATE_DIR (default <repo>/.aima), AIMA_PG_PORT (55432), AIMA_PG_DB (aima),
# AIMA_PG_USER (aima). The password is generated on first start and kept in <state>/postgres/password.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${AIMA_STATE_DIR:-$repo/.aima}/postgres"
port="${AIMA_PG_PORT:-55432}"
db="${AIMA_PG_DB:-aima}"
user="${AIMA_PG_USER:-aima}"
data="$state/data"
[[ -f "$state/datadir" ]] && data="$(cat "$state/datadir")"
address="127.0.0.1:$port"

log() { printf '%s postgres: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

bindir() {
  local d
  if d="$(command -v postgres 2>/dev/null)"; then
    d="$(dirname "$(readlink -f "$d")")"
    [[ -x "$d/pg_ctl" && -x "$d/initdb" && -x "$d/psql" ]] && { echo "$d"; return 0; }
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$d/postgres" ]] && { echo "$d"; return 0; }
  done
  return 1
}

install_server() {
  bindir >/dev/null && return 0
  log "PostgreSQL server not found; installing Debian's package"
  if [[ $(id -u) -ne 0 ]]; then log "run as root or install postgresql yourself"; return 1; fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

# PostgreSQL refuses to run as root; as root, the cluster belongs to the 'postgres' system user.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_super() { as_owner "$(bindir)/psql" -h /tmp -p "$port" -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

running() { [[ -n "$(bindir 2>/dev/null)" ]] && as_owner "$(bindir)/pg_ctl" -D "$data" status >/dev/null 2>&1; }

# PostgreSQL runs as the 'postgres' user (it refuses root), which may not be able to reach a state
# folder under a private home or checkout; the cluster then lives in a folder of its own under /var/tmp,
# and the state folder records where.
pick_data_dir() {
  if [[ -f "$state/datadir" ]]; then data="$(cat "$state/datadir")"; return 0; fi
  mkdir -p "$state"
  data="$state/data"
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres:postgres "$state"
    if ! runuser -u postgres -- test -w "$state"; then
      data="/var/tmp/aima-postgres-$(printf '%s' "$state" | md5sum | cut -c1-12)"
      log "the 'postgres' user cannot reach $state; the cluster lives in $data"
      mkdir -p "$data"; chown postgres:postgres "$data"; chmod 700 "$data"
    fi
  fi
  echo "$data" > "$state/datadir"
}

init_cluster() {
  [[ -f "$data/PG_VERSION" ]] && return 0
  log "initdb into $data"
  as_owner "$(bindir)/initdb" -D "$data" -U postgres -A peer --auth-host=scram-sha-256 -E UTF8 \
    --locale=C.UTF-8 >"$state/initdb.log" 2>&1 || { cat "$state/initdb.log" >&2; return 1; }
  cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '/tmp'
shared_buffers = 256MB
max_connections = 200
logging_collector = off
# The sink writes in bulk: checkpoints every 4 GB of WAL rather than every 1 GB.
max_wal_size = 4GB
CONF
}

start() {
  install_server
  pick_data_dir
  init_cluster
  if running; then log "already up at $address"; else
    local t0=$SECONDS
    local options=()
    # On the command line rather than in postgresql.conf, so the server still starts (plain) once the
    # library is gone.
    if has_timescaledb; then options=(-o "-c shared_preload_libraries=timescaledb"); fi
    as_owner "$(bindir)/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 "${options[@]}" start >/dev/null
    log "up at $address after $((SECONDS - t0)) s, log $data/server.log"
  fi
  ensure_role_and_db
  mode >/dev/null
}

ensure_role_and_db() {
  local pwfile="$state/password"
  if [[ ! -s "$pwfile" ]]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$pwfile")
  fi
  local pw; pw="$(cat "$pwfile")"
  if [[ "$(psql_super -c "SELECT 1 FROM pg_roles WHERE rolname = '$user'")" != 1 ]]; then
    psql_super -c "CREATE ROLE \"$user\" LOGIN CREATEDB CREATEROLE PASSWORD '$pw'"
  else
    # CREATEROLE: migration 0012 creates the dashboards' read-only group roles, `db grant-reader` their logins.
    psql_super -c "ALTER ROLE \"$user\" CREATEROLE PASSWORD '$pw'" >/dev/null
  fi
  if [[ "$(psql_super -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
    psql_super -c "CREATE DATABASE \"$db\" OWNER \"$user\""
  fi
  (umask 077; echo "postgresql://$user:$pw@$address/$db" > "$state/dsn")
}

# Whether this PostgreSQL has the TimescaleDB library (installed by a package or `make install`).
has_timescaledb() {
  local lib
  lib="$("$(bindir)/pg_config" --pkglibdir 2>/dev/null || echo "$(bindir)/../lib")"
  [[ -f "$lib/timescaledb.so" ]]
}

# TimescaleDB when the extension can be created (in public, which every migrated schema has on its
# search path); plain otherwise. The migrations create it too, but only a superuser may.
mode() {
  local m=postgres
  if psql_super -d "$db" -c "CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public" >/dev/null 2>&1; then
    m=timescaledb
  fi
  echo "$m" > "$state/mode"
  log "mode: $m"
  echo "$m"
}

stop() {
  if ! running; then log "not running"; return 0; fi
  as_owner "$(bindir)/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
  log "stopped"
}

status() {
  if running; then echo "up $address $(cat "$state/mode" 2>/dev/null || echo unknown)"; else echo "down $address"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  dsn) cat "$state/dsn" ;;
  *) echo "usage: $0 start|stop|status|dsn" >&2; exit 2 ;;
esac

#!/bin/sh
# The timescaledb service's entrypoint in docker-compose.tls.yml: PostgreSQL refuses a key file that is not
# owned by its own user (or root) with mode 0600 (0640 for root), and the mounted ./tls files belong to the
# host user. So, still as root, copy certificate and key into a folder of the postgres user, then hand over
# to the image's entrypoint (which drops to postgres) with the arguments compose gives.
set -eu
src=/etc/aima/tls
dst=/var/lib/postgresql/tls
mkdir -p "$dst"
cp "$src/timescaledb.crt" "$dst/server.crt"
cp "$src/timescaledb.key" "$dst/server.key"
chown -R postgres:postgres "$dst"
chmod 700 "$dst"
chmod 600 "$dst/server.key"
chmod 644 "$dst/server.crt"
exec docker-entrypoint.sh "$@"

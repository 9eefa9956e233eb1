#!/bin/sh
# Example certificates for docker-compose.tls.yml: a CA of your own and one server certificate per TLS
# listener of the compose stack, written to DIR (default ./tls, which .gitignore keeps out of git).
#
#   infra/tls/make-certs.sh [DIR [DAYS]]     (DAYS: validity of the server certificates, default 825)
#
# DIR/ca.pem              the CA every client verifies with (AIMA_KAFKA_SSL_CA_LOCATION, sslrootcert, Grafana)
# DIR/ca.key              the CA's key: never mounted into a container; keep it, or delete it once issued
# DIR/kafka.pem           the broker's PEM keystore: unencrypted PKCS#8 key, then its certificate chain
# DIR/timescaledb.crt,key PostgreSQL's certificate and key
# DIR/api.crt,key         the API's certificate and key (AIMA_API_TLS_CERT, AIMA_API_TLS_KEY)
#
# Each server certificate names the compose service (the host name clients in the stack verify:
# kafka, timescaledb, api) and localhost/127.0.0.1 (clients on the host, through the published ports).
# An existing CA is reused, so certificates can be reissued (e.g. expired) without touching the clients;
# existing server certificates are overwritten. Needs only openssl.
#
# File modes: DIR is 0700 (only you reach it on the host); the files compose mounts are 0644 because the
# containers read them as their own non-root users (Kafka's appuser, the project image's aima, uid 10001),
# which are not your uid. The CA key is 0600.
set -eu

dir=${1:-tls}
days=${2:-825}

mkdir -p "$dir"
chmod 700 "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

newkey() { # an EC P-256 key, PKCS#8, unencrypted (what Kafka's PEM keystore and PostgreSQL read)
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.pem" ]; then
    (umask 077 && newkey "$dir/ca.key")
    openssl req -x509 -new -key "$dir/ca.key" -out "$dir/ca.pem" -days 3650 -sha256 \
        -subj "/CN=aima-metrics compose CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    echo "made the CA $dir/ca.pem"
fi
chmod 600 "$dir/ca.key"
chmod 644 "$dir/ca.pem"

issue() { # issue NAME: $work/NAME.key and $dir/NAME.crt for the service NAME, localhost and 127.0.0.1
    name=$1
    newkey "$work/$name.key"
    openssl req -new -key "$work/$name.key" -out "$work/$name.csr" -subj "/CN=$name"
    cat > "$work/$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1
EXT
    openssl x509 -req -in "$work/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
        -extfile "$work/$name.ext" -out "$work/$name.crt"
    cat "$work/$name.crt" "$dir/ca.pem" > "$dir/$name.crt" # leaf, then the chain
    echo "issued $dir/$name.crt for $name, localhost, 127.0.0.1 ($days days)"
}

issue kafka
cat "$work/kafka.key" "$dir/kafka.crt" > "$dir/kafka.pem"
rm "$dir/kafka.crt"

issue timescaledb
cp "$work/timescaledb.key" "$dir/timescaledb.key"

issue api
cp "$work/api.key" "$dir/api.key"

chmod 644 "$dir/kafka.pem" "$dir/timescaledb.crt" "$dir/timescaledb.key" "$dir/api.crt" "$dir/api.key"

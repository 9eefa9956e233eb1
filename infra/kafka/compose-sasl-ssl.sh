#!/bin/sh
# The kafka service's entrypoint in docker-compose.tls.yml (apache/kafka image): runs the broker from
# infra/kafka/server-sasl-ssl.properties instead of the image's KAFKA_* environment. The image's own
# configure step insists on JKS keystores with password files as soon as a listener says SSL, and its
# storage format cannot create SCRAM users, which must exist before a SASL_SSL-only broker lets anyone in.
#
# Listeners: SASL_SSL on :9092 for the containers (advertised kafka:9092) and EXTERNAL, also SASL_SSL, on
# :29092 for the host (advertised localhost:9092, the published port); the controller stays on loopback.
# Needs BROKER_ADMIN_PASSWORD (the broker's own SCRAM user, admin) and BROKER_AIMA_PASSWORD (the
# pipeline's user, aima), which the overlay sets from the two Kafka passwords it requires; both users are
# created when the data volume is formatted, i.e. on the first start.
# Later password changes: kafka-configs.sh --alter (see the properties file).
set -eu

: "${BROKER_ADMIN_PASSWORD:?set BROKER_ADMIN_PASSWORD}"
: "${BROKER_AIMA_PASSWORD:?set BROKER_AIMA_PASSWORD}"
KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
TEMPLATE=${BROKER_TEMPLATE:-/etc/aima/kafka/server-sasl-ssl.properties}
TLS=${BROKER_TLS_DIR:-/etc/aima/tls}
DATA=${BROKER_DATA_DIR:-/var/lib/kafka/data}
CLUSTER_ID=${CLUSTER_ID:?set CLUSTER_ID}
MECHANISM=SCRAM-SHA-512
CONF=${TMPDIR:-/tmp}/aima-kafka
mkdir -p "$CONF"
chmod 700 "$CONF"

# sed replacement text: escape \ & and the | delimiter (passwords may hold them).
quote() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

sed -e "s|@KAFKA_PORT@|9092|g" \
    -e "s|@CONTROLLER_PORT@|9093|g" \
    -e "s|@DATA_DIR@|$DATA|g" \
    -e "s|@KEYSTORE_PEM@|$TLS/kafka.pem|g" \
    -e "s|@CA_PEM@|$TLS/ca.pem|g" \
    -e "s|@ADMIN_USER@|admin|g" \
    -e "s|@ADMIN_PASSWORD@|$(quote "$BROKER_ADMIN_PASSWORD")|g" \
    "$TEMPLATE" > "$CONF/server.properties"
# Later keys win in a properties file: the compose network's listeners instead of the loopback ones.
cat >> "$CONF/server.properties" <<PROPS

# docker-compose.tls.yml: containers and the host, both SASL_SSL.
listeners=SASL_SSL://:9092,EXTERNAL://:29092,CONTROLLER://127.0.0.1:9093
advertised.listeners=SASL_SSL://kafka:9092,EXTERNAL://localhost:9092
listener.security.protocol.map=SASL_SSL:SASL_SSL,EXTERNAL:SASL_SSL,CONTROLLER:PLAINTEXT
listener.name.external.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
PROPS
chmod 600 "$CONF/server.properties"

# What the healthcheck (and an operator's kafka-*.sh --command-config) logs in with.
cat > "$CONF/admin-client.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=$MECHANISM
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(printf '%s' "$BROKER_ADMIN_PASSWORD" | sed -e 's/[\\"]/\\&/g')";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
PROPS
chmod 600 "$CONF/admin-client.properties"

if [ ! -f "$DATA/meta.properties" ]; then
    "$KAFKA_HOME/bin/kafka-storage.sh" format -t "$CLUSTER_ID" -c "$CONF/server.properties" \
        --add-scram "$MECHANISM=[name=admin,password=$BROKER_ADMIN_PASSWORD]" \
        --add-scram "$MECHANISM=[name=aima,password=$BROKER_AIMA_PASSWORD]"
fi
exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$CONF/server.properties"

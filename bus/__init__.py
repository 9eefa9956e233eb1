"""What every side of the pipeline shares: settings, topics, the Avro codec, Kafka clients, the metric
catalogue. Producers, streams, consumers and the API meet only here, on Kafka and in the database."""

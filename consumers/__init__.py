"""Kafka consumers that leave the bus: the database sink with its migrations, and the notifier."""

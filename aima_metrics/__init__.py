"""The command line and the local stack: the one place that composes producers, streams, consumers and
the API."""

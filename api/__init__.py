"""The REST API over the database."""

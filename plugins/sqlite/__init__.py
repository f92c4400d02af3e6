"""The `sqlite` output plugin: points and metric definitions in a SQLite file."""

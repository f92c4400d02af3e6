"""The `console` output plugin: human-readable lines on stdout."""

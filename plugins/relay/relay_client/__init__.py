"""The `relay-client` output plugin: sends batches to a relay server, buffered on disk until acknowledged."""

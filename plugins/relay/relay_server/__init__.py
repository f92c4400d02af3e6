"""The `relay-server` source plugin: takes batches from relay-client agents into the pipeline."""

"""The `http-in` source plugin: relay batches, JSON points and Graphite lines over HTTP."""

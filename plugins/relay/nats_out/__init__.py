"""The `nats-out` output plugin: publishes batches to a NATS JetStream stream."""

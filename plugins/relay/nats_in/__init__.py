"""The `nats-in` source plugin: takes batches from a NATS JetStream stream (a shared durable consumer)."""

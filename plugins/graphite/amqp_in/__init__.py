"""The `amqp-in` source plugin: Graphite plaintext lines from a RabbitMQ queue."""

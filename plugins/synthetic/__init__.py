"""The `synthetic` source plugin: a load generator for benchmarks and demos."""

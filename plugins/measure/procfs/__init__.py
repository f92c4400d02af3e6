"""The `procfs` source plugin: kernel and per-process metrics read from /proc."""

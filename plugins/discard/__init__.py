"""The `discard` output plugin: counts points and drops them, for benchmarks."""

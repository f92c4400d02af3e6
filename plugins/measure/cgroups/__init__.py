"""The `cgroups` source plugin: per-cgroup counters, cgroups announced as consumers."""

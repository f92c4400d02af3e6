"""Pure parsers of Linux /proc and cgroup files, shared by the measurement plugins."""

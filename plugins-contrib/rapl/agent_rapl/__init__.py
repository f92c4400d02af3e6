"""The `rapl` plugin for the measurement agent: CPU package and DRAM energy from /sys/class/powercap.

A separate distribution (`agent-plugin-rapl`), found by the agent through its `agent.plugins` entry point.
"""

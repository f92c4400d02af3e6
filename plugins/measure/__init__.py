"""The measurement family: what a process, a cgroup and the machine use, and the energy behind it.

- `linux/`: parsers of /proc and cgroup files, pure functions shared by the plugins below;
- `procfs`: kernel and per-process counters from /proc;
- `cgroups`: per-cgroup counters, cgroups announced as consumers as they come and go;
- `energy_estimation_tdp`: CPU package energy estimated from CPU use and a TDP;
- `energy_attribution`: the machine's energy shared among consumers by CPU time;
- `energy_to_carbon`: grams of CO2-equivalent from energy.
"""

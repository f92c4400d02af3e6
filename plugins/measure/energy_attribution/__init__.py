"""The `energy-attribution` transform: the machine's energy shared among consumers by CPU time."""

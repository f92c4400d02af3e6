"""The `energy-estimation-tdp` source: CPU package energy estimated from CPU use and a TDP."""

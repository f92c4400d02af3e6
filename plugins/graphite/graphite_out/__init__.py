"""The `graphite-out` output plugin: a Graphite relay's routing table, destinations with disk spools, admin ports."""

"""The `graphite-in` source plugin: carbon plaintext (TCP, UDP) and pickle (TCP) listeners."""

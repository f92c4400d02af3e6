"""Graphite protocol code shared by the Graphite plugins: plaintext and pickle codecs, tags, hashing, routing, aggregation."""

"""The graphite family: its protocol package and the plugins built on it."""

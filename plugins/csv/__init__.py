"""The `csv` output plugin: points as rows of a `;`-separated file."""

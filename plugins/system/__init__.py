"""The `system` source plugin: machine and process metrics read with psutil."""

"""Built-in plugins, installed as the `agent_plugins` package."""

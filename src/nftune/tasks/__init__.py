"""Self-contained tasks and tiny models: the demo runs with no hub and no GPU."""

"""One module per command group; each registers itself on the app in `register(app)`."""

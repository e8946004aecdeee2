"""Named model and run configs, shipped as package data (read them with `importlib.resources`)."""

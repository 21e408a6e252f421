"""Command groups kept out of cli.py; each module has `register(app)`, called at the end of cli.py."""

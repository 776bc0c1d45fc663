"""The web UI, the only package that imports gradio: app.py puts the page together from one
builder per tab; server.py starts it. Importing this package loads nothing heavy, so the server's
start-up checks (port, password, runs folder) answer before gradio and torch load."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio loads: no network calls, no tracking

"""One loaded base, many adapters (playground.py), and the imports done before serving (warmup.py)."""

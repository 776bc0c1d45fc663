"""Did the fine-tune help: base vs adapter on held-out rows (heldout.py)."""

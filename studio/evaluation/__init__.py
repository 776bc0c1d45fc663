"""Did the fine-tune help: base vs adapter on held-out rows, by loss (heldout.py) and by task scores on
generated answers (task.py: metrics.py, shapes.py, stats.py)."""

"""What fits where: the hardware (hardware.py), what `auto` precision means (precision.py), the
peak-memory estimate (memory.py) and the verdict per method with its reasons (planner.py)."""

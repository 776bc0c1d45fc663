"""The registry on disk: a run folder per run (registry.py), the typed records it writes
(records.py), the base model's fingerprint (fingerprint.py) and atomic file writes (files.py)."""

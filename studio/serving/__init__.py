"""Serving trained adapters over an OpenAI-compatible API, each request picking its adapter.

catalog.py     which model ids exist (the base, finished LoRA/QLoRA runs and checkpoints on it)
engine.py      requests batched per step on one base, each row through its own adapter
openai_api.py  /v1/models, /v1/chat/completions, /v1/completions, /metrics (FastAPI router)
stats.py       the request log line and per-adapter counters
server.py      the API as an app: alone for `finetune-studio serve`, mounted on the UI's server
"""

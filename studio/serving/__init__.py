"""Serving trained adapters over an OpenAI-compatible API, each request picking its adapter.

catalog.py     which model ids exist (the base, finished LoRA/QLoRA runs and checkpoints on it)
engine.py      requests batched per step on one base, each row through its own adapter
openai_api.py  /v1/models, /v1/chat/completions, /v1/completions, /metrics (FastAPI router)
checks.py      each request's key, body and fields checked; errors in OpenAI's shape
logprobs.py    token log-probabilities (prompt with echo, reply) and their OpenAI shapes
tokenizer_api.py  /tokenize, /detokenize, /tokenizer_info, as vLLM answers them (lm-eval uses them)
stats.py       the request log line and per-adapter counters
server.py      the API as an app: alone for `finetune-studio serve`, mounted on the UI's server
"""

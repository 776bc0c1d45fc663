"""Finetune Studio: no-code fine-tuning of language models (core library; no gradio here)."""

__version__ = "0.1.0"

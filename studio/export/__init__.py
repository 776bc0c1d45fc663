"""Take a trained run out of the studio, and bring one back in.

zips.py (adapter and merged zips), model_card.py (the README in each), gguf_convert.py ->
gguf_export.py -> gguf_parity.py (llama.cpp file, Ollama Modelfile, the parity check),
chat_format.py (the template's roles as Ollama/llama.cpp see them), adapter_import.py and
zip_safety.py (a zip from elsewhere, checked before anything is extracted).
"""

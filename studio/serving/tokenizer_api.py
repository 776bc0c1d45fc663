"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-evaluation-harness's ``local-completions`` looks for them at the server's root (its
``base_url`` without ``/v1/completions``) before anything else: when ``/tokenizer_info`` answers
with an ``eos_token`` and ``/tokenize`` with ``{"tokens": [...]}``, it tokenizes through the
server; otherwise it loads the model id as a Hugging Face tokenizer, which fails for an adapter's
id and for any model offline. Shapes are vLLM's: ``{"count", "max_model_len", "tokens"}``,
``{"prompt": "..."}`` and the tokenizer's special tokens and chat template. ``model`` is optional
(the base when left out); an adapter's id answers with the tokenizer saved with its run.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from studio.models import ModelError
from studio.serving import checks
from studio.serving.checks import ApiError, authorize


def add_tokenizer_routes(router: APIRouter, ctx) -> None:
    """The three routes on ``router``, answering from ``ctx``'s catalog (a ServingContext)."""

    @router.post("/tokenize")
    async def tokenize(request: Request):
        try:
            authorize(ctx.api_key, request)
            data = await checks.read_json(request)
            served, tokenizer = _pick(ctx, data.get("model"))
            if data.get("messages") is not None:  # vLLM's chat form: the template applied first
                generation = checks.flag(data, "add_generation_prompt", default=True)
                text = tokenizer.apply_chat_template(
                    checks.messages(data), add_generation_prompt=generation, tokenize=False
                )
                special = checks.flag(data, "add_special_tokens", default=False)
            elif isinstance(data.get("prompt"), str):
                text, special = data["prompt"], checks.flag(data, "add_special_tokens", default=True)
            else:
                raise ApiError(400, "Send `prompt` (a string) or `messages` to tokenize.", "prompt")
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            context = ctx.catalog.context_length(served)
            return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": None}
        except ApiError as exc:
            return exc.response()

    @router.post("/detokenize")
    async def detokenize(request: Request):
        try:
            authorize(ctx.api_key, request)
            data = await checks.read_json(request)
            served, tokenizer = _pick(ctx, data.get("model"))
            tokens = data.get("tokens")
            if not isinstance(tokens, list):
                raise ApiError(400, "`tokens` must be a list of token ids.", "tokens")
            ids = checks.token_ids(tokens, "tokens", ctx.catalog.vocab_size(served), "tokens", allow_empty=True)
            return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
        except ApiError as exc:
            return exc.response()

    @router.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        try:
            authorize(ctx.api_key, request)
            served, tokenizer = _pick(ctx, request.query_params.get("model"))
        except ApiError as exc:
            return exc.response()
        template = getattr(tokenizer, "chat_template", None)
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **{name: _text(getattr(tokenizer, name, None)) for name in _SPECIAL},
            "chat_template": template if isinstance(template, str) else None,
            "model_max_length": ctx.catalog.context_length(served),
            "vocab_size": ctx.catalog.vocab_size(served),
        }


_SPECIAL = ("eos_token", "bos_token", "pad_token", "unk_token")


def _text(token) -> str | None:
    return None if token is None else str(token)


def _pick(ctx, model_id):
    """The served entry and its tokenizer: the named model's, or the base's when none is named."""
    served = checks.served(ctx.catalog, ctx.catalog.base if model_id is None else model_id)
    try:
        return served, ctx.catalog.tokenizer(served)
    except ModelError as exc:
        raise ApiError(500, str(exc)) from None

"""`POST /v1/embeddings`, as OpenAI's: sentence vectors by the curation embedder (`--curation.embedding-model`,
the packaged all-MiniLM-L6-v2 by default), the one instance curation and monitoring use, named in
`GET /v1/models` by `Workspace.embedding_model()`. Texts only: token arrays are refused (a client's token
ids are another tokenizer's, OpenAI's). Vectors are unit length, as floats or as base64 of little-endian
float32; `usage` counts the tokens the embedder's own tokenizer reads.

Embedding runs on the chat pool (it answers a caller, as chat does), at most `EMBED_THREADS` requests at
once: the others wait asleep on the event loop, so a burst of embeddings never holds the threads chats need.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from assistant.api.executors import on_chat
from assistant.api.openai_schema import Strict
from assistant.errors import AssistantError
from assistant.workspace import Workspace

MAX_INPUTS = 256               # texts in one request (OpenAI's is 2048; these run on the CPU beside chats)
MAX_INPUT_CHARS = 16_000       # one text, before it is tokenized (the model reads 256 tokens of it at most anyway)
EMBED_THREADS = 2              # embedding requests holding a chat-pool thread at once


class EmbeddingRequest(Strict):
    model: str
    input: str | list[Any] = Field(description="a text or a list of texts (token arrays are refused)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(strict=True)] | None = None
    user: Annotated[str, Field(strict=True, max_length=256)] | None = None


def texts_of(value) -> list[str]:
    """The request's `input` as texts, or a 400 naming `input` and why."""
    items = [value] if isinstance(value, str) else value
    if not items:
        raise AssistantError("input is empty: send a text or a list of texts", param="input")
    if len(items) > MAX_INPUTS:
        raise AssistantError(f"input has {len(items)} texts; the limit is {MAX_INPUTS} per request: send several "
                             "requests", param="input")
    for i, item in enumerate(items):
        where = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise AssistantError("input: token arrays are not supported: send the text (token ids would be another "
                                 "tokenizer's; with LangChain's OpenAIEmbeddings set check_embedding_ctx_length=False)",
                                 param="input")
        if not isinstance(item, str):
            raise AssistantError(f"{where} must be text", param="input")
        if len(item) > MAX_INPUT_CHARS:
            raise AssistantError(f"{where} is {len(item)} characters; the limit is {MAX_INPUT_CHARS}: split it",
                                 param="input")
    return items


def _body(vectors: np.ndarray, counts: list[int], model: str, encoding: str) -> bytes:
    """The JSON answer (built off the event loop: a few hundred vectors are a few MB of text)."""
    if encoding == "base64":
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = vectors.astype(np.float32).tolist()
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    total = sum(counts)
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": total, "total_tokens": total}}).encode()


def add_embedding_routes(r: APIRouter, workspace: Workspace) -> None:
    slots = asyncio.Semaphore(EMBED_THREADS)

    def embed(body: EmbeddingRequest, texts: list[str]) -> tuple[bytes, int]:
        vectors, counts = workspace.embed(body.model, texts, body.dimensions)
        return _body(vectors, counts, workspace.embedding_model(), body.encoding_format), sum(counts)

    @r.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        request.state.model = body.model     # the access log's (never the input)
        texts = texts_of(body.input)
        async with slots:
            data, tokens = await on_chat(embed, body, texts)
        request.state.tokens = tokens
        return Response(data, media_type="application/json")

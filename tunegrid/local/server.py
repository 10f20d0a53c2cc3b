"""One deployment's model server: `python -m tunegrid.local.server --model DIR --port P --name DEP`.

Loads the registered model's folder (the MLflow model's `model/` and `components/tokenizer/`
subfolders, or a plain HF folder) with transformers, warms it up, then serves on 127.0.0.1:

- `GET /health`: 200 once the model is loaded (the readiness probe).
- `POST /score`: the Azure ML scoring contract.
  `{"input_data": {"input_string": [[{role, content}...]], "parameters": {...}}, "params": {}}`.
  One conversation (or a flat list of messages) answers `{"output": "<assistant text>", "finish_reason":
  "stop"|"length", "usage": {...}}` (the tokenizer is known here, so the counts are real); several
  conversations answer `[{"0": "<text>"}, {"0": "<text>"}, ...]`, one object per conversation.
  Parameters: temperature, top_p, do_sample, max_new_tokens (or max_tokens).
  With `Accept: application/x-ndjson` and one conversation, the answer streams as it is generated
  (transformers' `AsyncTextIteratorStreamer`), one JSON object a line: `{"delta": "<text>"}` pieces,
  then `{"finish_reason": ..., "usage": {...}}` (or `{"error": "..."}`). A caller that hangs up stops
  the generation at the next token (a stopping criterion), and its slot is free at once.
- `POST /v1/chat/completions` (also `/chat/completions`): the OpenAI chat shape.

Only the endpoint's router calls it: requests need the deployment's internal token
(`TUNEGRID_SERVER_TOKEN`). More than `--max-concurrent` requests in flight get 429, as a managed
online deployment does with max_concurrent_requests_per_instance.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunegrid.local.streaming import StreamedBody

log = logging.getLogger("tunegrid.server")

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_CAP = 2048


class BadRequest(ValueError):
    pass


def model_folders(path: Path) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of an MLflow transformers model or a plain HF folder."""
    if (path / "MLmodel").is_file():
        weights = path / "model"
        tokenizer = path / "components" / "tokenizer"
        return weights, tokenizer if tokenizer.is_dir() else weights
    return path, path


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("a conversation must be a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise BadRequest(f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BadRequest(f"message {i} needs a role (system, user, assistant) and a string content")
        out.append({"role": role, "content": content})
    return out


def parse_score_request(body: Any) -> tuple[list[list[dict[str, str]]], bool, dict[str, Any]]:
    """(conversations, several?, generation parameters) from an Azure ML scoring body."""
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be a JSON object with input_data")
    data = body.get("input_data")
    if not isinstance(data, Mapping):
        raise BadRequest("input_data must be an object with input_string and parameters")
    raw = data.get("input_string")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("input_data.input_string must be a list of conversations or of messages")
    if all(isinstance(item, list) for item in raw):
        conversations = [parse_messages(item) for item in raw]
        several = len(conversations) > 1
    else:
        conversations = [parse_messages(raw)]
        several = False
    params: dict[str, Any] = {}
    for source in (body.get("params"), data.get("parameters")):
        if isinstance(source, Mapping):
            params.update(source)
    return conversations, several, params


def generation_kwargs(params: Mapping[str, Any], *, pad_token_id: int | None) -> dict[str, Any]:
    try:
        max_new = int(params.get("max_new_tokens", params.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)))
        temperature = float(params.get("temperature", 0.0))
        top_p = float(params.get("top_p", 1.0))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad generation parameter: {exc}") from exc
    if max_new < 1:
        raise BadRequest("max_new_tokens must be at least 1")
    do_sample = params.get("do_sample")
    sample = (str(do_sample).lower() == "true") if do_sample is not None else temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": min(max_new, MAX_NEW_TOKENS_CAP), "pad_token_id": pad_token_id}
    if sample:
        kwargs.update(
            do_sample=True,
            temperature=max(temperature, 1e-3) if temperature > 0 else 1.0,
            top_p=min(max(top_p, 1e-3), 1.0),
        )
    else:
        kwargs["do_sample"] = False
    return kwargs


class ChatModel:
    """The loaded model; generation is serialised (one forward pass at a time)."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weights, tokenizer = model_folders(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer)
        model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        self.model: Any = model.to(self.device).eval()
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.lock = threading.Lock()

    def generate(
        self, conversation: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> tuple[str, int, int, str]:
        """(text, prompt tokens, completion tokens, finish reason)."""
        import torch

        kwargs = generation_kwargs(params, pad_token_id=self.tokenizer.pad_token_id)
        ids = self._prompt_ids(conversation, kwargs["max_new_tokens"])
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device), **kwargs
            )
        new = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        finish = "length" if len(new) >= kwargs["max_new_tokens"] else "stop"
        return text, int(ids.shape[1]), len(new), finish

    async def stream(self, conversation: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> Any:
        """Yields the text as it is generated, then a final (finish reason, usage) tuple. Closing the
        generator early (the caller went away) stops the generation at its next token."""
        import torch
        from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

        kwargs = generation_kwargs(params, pad_token_id=self.tokenizer.pad_token_id)
        ids = self._prompt_ids(conversation, kwargs["max_new_tokens"])
        cancelled = threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with self.lock, torch.inference_mode():
                    out = self.model.generate(
                        input_ids=ids.to(self.device),
                        attention_mask=torch.ones_like(ids).to(self.device),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        **kwargs,
                    )
                result["completion_tokens"] = int(out.shape[1] - ids.shape[1])
            except BaseException as exc:  # reported to the caller as the stream's error line
                result["error"] = f"{type(exc).__name__}: {exc}"
                streamer.end()

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        try:
            async for text in streamer:
                if text:
                    yield text
            await asyncio.to_thread(worker.join)
        finally:
            cancelled.set()
        if "error" in result:
            raise RuntimeError(result["error"])
        produced = result["completion_tokens"]
        finish = "length" if produced >= kwargs["max_new_tokens"] else "stop"
        prompt = int(ids.shape[1])
        yield finish, {"prompt_tokens": prompt, "completion_tokens": produced, "total_tokens": prompt + produced}

    def _prompt_ids(self, conversation: Sequence[Mapping[str, str]], max_new_tokens: int) -> Any:
        enc = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        ids = enc["input_ids"]
        room = self.max_positions - max_new_tokens
        return ids[:, -max(room, 1) :] if ids.shape[1] > room else ids  # keep the end of a long conversation


STREAM_TYPE = "application/x-ndjson"


async def ndjson_lines(pieces: Any) -> Any:
    """The model's stream as NDJSON lines: `{"delta"}` pieces, then `{"finish_reason", "usage"}`, or
    `{"error"}` when generation failed part way."""
    first = True
    try:
        async for item in pieces:
            if isinstance(item, str):
                text = item.lstrip() if first else item
                if text:
                    first = False
                    yield json.dumps({"delta": text}).encode() + b"\n"
            else:
                yield json.dumps({"finish_reason": item[0], "usage": item[1]}).encode() + b"\n"
    except Exception as exc:
        log.exception("streamed generation failed")
        yield json.dumps({"error": f"generation failed: {type(exc).__name__}"}).encode() + b"\n"
    finally:
        await pieces.aclose()


def build_app(model: ChatModel, *, name: str, token: str, max_concurrent: int) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    in_flight = 0

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "Healthy", "deployment": name})

    def release() -> None:
        nonlocal in_flight
        in_flight -= 1

    async def guarded(request: Request, handler: Any, *, stream: Any = None) -> Any:
        nonlocal in_flight
        if not authorized(request):
            return JSONResponse({"message": "unauthorized"}, status_code=401)
        if in_flight >= max_concurrent:
            return JSONResponse(
                {"message": f"too many requests: deployment {name} allows {max_concurrent} at a time"}, status_code=429
            )
        in_flight += 1
        held = True
        try:
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"message": "the body is not JSON"}, status_code=400)
            try:
                if stream is not None and STREAM_TYPE in request.headers.get("accept", ""):
                    pieces = stream(body)
                    if pieces is not None:
                        held = False  # the stream gives the slot back when it ends
                        headers = [(b"content-type", STREAM_TYPE.encode()), (b"cache-control", b"no-cache")]
                        return StreamedBody(ndjson_lines(pieces), headers=headers, done=release)
                return await run_in_threadpool(handler, body)
            except BadRequest as exc:
                return JSONResponse({"message": str(exc)}, status_code=400)
            except Exception as exc:
                log.exception("generation failed")
                return JSONResponse({"message": f"generation failed: {type(exc).__name__}"}, status_code=500)
        finally:
            if held:
                release()

    def score(body: Any) -> JSONResponse:
        conversations, several, params = parse_score_request(body)
        answers = [model.generate(c, params) for c in conversations]
        if several:
            return JSONResponse([{"0": a[0]} for a in answers])
        text, prompt_tokens, completion_tokens, finish = answers[0]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return JSONResponse({"output": text, "finish_reason": finish, "usage": usage})

    def score_stream(body: Any) -> Any:
        """The generator of a streamed answer, or None when the request has several conversations."""
        conversations, several, params = parse_score_request(body)
        if several:
            return None
        generation_kwargs(params, pad_token_id=None)  # bad parameters are a 400 before the stream starts
        return model.stream(conversations[0], params)

    def chat_completions(body: Any) -> JSONResponse:
        if not isinstance(body, Mapping):
            raise BadRequest("the body must be a JSON object")
        messages = parse_messages(body.get("messages"))
        params = {k: body[k] for k in ("temperature", "top_p", "max_tokens") if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None:
            params["max_tokens"] = body["max_completion_tokens"]
        text, prompt_tokens, completion_tokens, finish = model.generate(messages, params)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def score_route(request: Request) -> Any:
        return await guarded(request, score, stream=score_stream)

    async def chat_route(request: Request) -> JSONResponse:
        return await guarded(request, chat_completions)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/", health, methods=["GET"]),
            Route("/score", score_route, methods=["POST"]),
            Route("/v1/chat/completions", chat_route, methods=["POST"]),
            Route("/chat/completions", chat_route, methods=["POST"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunegrid.local.server")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-concurrent", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s server %(levelname)s: %(message)s")
    token = os.environ.get("TUNEGRID_SERVER_TOKEN", "")
    if not token:
        print("TUNEGRID_SERVER_TOKEN is not set", file=sys.stderr)
        return 2
    started = time.monotonic()
    model = ChatModel(args.model)
    model.generate([{"role": "user", "content": "hi"}], {"max_new_tokens": 1})  # warm-up
    log.info(
        "deployment %s: model loaded from %s in %.1f s; listening on 127.0.0.1:%d",
        args.name,
        args.model,
        time.monotonic() - started,
        args.port,
    )
    import uvicorn

    app = build_app(model, name=args.name, token=token, max_concurrent=max(1, args.max_concurrent))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The scoring proxy's use case: authorise, validate, pick the live model, translate OpenAI <-> Azure ML,
call the endpoint through the `Upstream` port, normalise the answer.

The HTTP functions (`functions/chat.py`) only turn a request into bytes and header values, call
`ScoringService` and map its errors to status codes. Everything here is per process: the service is
built once and serves every invocation (settings, key digests, the live-model table, retries).

Translation (OpenAI chat request -> Azure ML scoring request), as documented in docs/scoring.md:

| OpenAI field | accepted | Azure ML `input_data` |
|---|---|---|
| messages | roles system/developer/user/assistant, text content | `input_string`: `[messages] * n` |
| temperature | 0..2, default 1 | `parameters.temperature`, `do_sample = temperature > 0` |
| top_p | (0, 1], default 1 | `parameters.top_p` (sampling only) |
| max_tokens / max_completion_tokens | int >= 1, default 256 | `parameters.max_new_tokens`, capped |
| stop | string or up to 4 strings | `parameters.stop`; the proxy also cuts the answer there |
| n | 1 only (else 400) | |
| seed | integer | `parameters.seed` |

Modules: `errors` (the refusals), `auth` (`ApiKeys`), `chat_request` and `score_request` (request
parsing), `output` (answer normalisation, stream events, stop sequences), `live_models` (the live-model
table), `admission` (the per-deployment FIFO queue), `render` (OpenAI completion and chunk events) and
`service` (`ScoringService`, which ties them together). Parsing, normalisation and rendering are pure.
Import from this package: the names below are its interface.
"""

from __future__ import annotations

from shared.usecases.scoring.admission import Admission, Gate, QueueRejected
from shared.usecases.scoring.auth import ApiKeys
from shared.usecases.scoring.chat_request import (
    CHAT_ROLES,
    DEFAULT_MAX_TOKENS,
    MAX_MESSAGES,
    MAX_STOP,
    NEUTRAL_VALUES,
    UNSUPPORTED_FIELDS,
    ChatRequest,
    parse_chat_request,
    parse_messages,
    to_azureml_request,
)
from shared.usecases.scoring.errors import (
    InvalidRequest,
    ModelNotFound,
    NoLiveModel,
    PayloadTooLarge,
    Unauthorized,
    UpstreamBusy,
    UpstreamRejected,
)
from shared.usecases.scoring.live_models import DEFAULT_ALIASES, LiveModel, LiveModels, build_model_table
from shared.usecases.scoring.output import (
    ModelOutput,
    StopScanner,
    StreamEvent,
    apply_stop,
    normalise_output,
    parse_stream_event,
    split_for_stream,
)
from shared.usecases.scoring.render import ChunkRenderer, render_completion
from shared.usecases.scoring.score_request import MAX_CONVERSATIONS, PARAMETERS, ScoreRequest, parse_score_request
from shared.usecases.scoring.service import REJECTED_STATUS, RETRYABLE_STATUS, Reply, ScoringService, StreamReply

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_ALIASES",
    "DEFAULT_MAX_TOKENS",
    "MAX_CONVERSATIONS",
    "MAX_MESSAGES",
    "MAX_STOP",
    "NEUTRAL_VALUES",
    "PARAMETERS",
    "REJECTED_STATUS",
    "RETRYABLE_STATUS",
    "UNSUPPORTED_FIELDS",
    "Admission",
    "ApiKeys",
    "ChatRequest",
    "ChunkRenderer",
    "Gate",
    "InvalidRequest",
    "LiveModel",
    "LiveModels",
    "ModelNotFound",
    "ModelOutput",
    "NoLiveModel",
    "PayloadTooLarge",
    "QueueRejected",
    "Reply",
    "ScoreRequest",
    "ScoringService",
    "StopScanner",
    "StreamEvent",
    "StreamReply",
    "Unauthorized",
    "UpstreamBusy",
    "UpstreamRejected",
    "apply_stop",
    "build_model_table",
    "normalise_output",
    "parse_chat_request",
    "parse_messages",
    "parse_score_request",
    "parse_stream_event",
    "render_completion",
    "split_for_stream",
    "to_azureml_request",
]

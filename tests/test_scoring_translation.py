"""The scoring proxy's translation tables: OpenAI request -> Azure ML request, Azure ML answers -> one
shape, the score route's two input forms, key checks and live-model selection."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from shared.domain.runs import RunState
from shared.errors import UpstreamError
from shared.usecases.scoring import (
    ApiKeys,
    ChunkRenderer,
    InvalidRequest,
    LiveModel,
    LiveModels,
    ModelNotFound,
    NoLiveModel,
    StopScanner,
    Unauthorized,
    apply_stop,
    normalise_output,
    parse_chat_request,
    parse_score_request,
    parse_stream_event,
    split_for_stream,
    to_azureml_request,
)
from tests.scoring_support import MemoryLedger, live_record

USER = [{"role": "user", "content": "Hi"}]
CAP = 512


def translate(**fields: Any) -> dict[str, Any]:
    return to_azureml_request(parse_chat_request({"model": "m", "messages": USER, **fields}, max_tokens_cap=CAP))


@pytest.mark.parametrize(
    ("fields", "parameters"),
    [
        ({}, {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0, "top_p": 1.0}),
        (
            {"temperature": 0.6, "top_p": 0.9, "max_tokens": 200},
            {"max_new_tokens": 200, "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        ),
        ({"temperature": 0}, {"max_new_tokens": 256, "do_sample": False}),
        ({"temperature": 0, "top_p": 0.5, "seed": 7}, {"max_new_tokens": 256, "do_sample": False, "seed": 7}),
        ({"max_tokens": 100000}, {"max_new_tokens": CAP, "do_sample": True, "temperature": 1.0, "top_p": 1.0}),
        ({"max_completion_tokens": 12}, {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_p": 1.0}),
        (
            {"stop": "\n\n"},
            {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "stop": ["\n\n"]},
        ),
        (
            {"stop": ["a", "b"], "seed": 1},
            {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "stop": ["a", "b"], "seed": 1},
        ),
        (
            {"user": "u1", "metadata": {"a": "b"}, "tool_choice": "none", "logprobs": False},
            {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0, "top_p": 1.0},
        ),
    ],
)
def test_chat_parameters_translate_to_azureml(fields: dict[str, Any], parameters: dict[str, Any]) -> None:
    """Each OpenAI parameter maps to its Azure ML parameter (max_tokens capped, greedy drops sampling knobs)."""
    body = translate(**fields)
    assert body == {"input_data": {"input_string": [USER], "parameters": parameters}, "params": {}}


def test_n_of_one_is_accepted_and_more_is_refused() -> None:
    """n = 1 (or absent) sends one conversation; n > 1 is a 400 saying to send n requests instead."""
    assert translate(n=1)["input_data"]["input_string"] == [USER]
    with pytest.raises(InvalidRequest, match="send n requests") as err:
        translate(n=3)
    assert (err.value.param, err.value.code) == ("n", "unsupported_parameter")


@pytest.mark.parametrize(
    ("messages", "sent"),
    [
        (
            [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}],
            [{"role": "user", "content": "Hello"}],
        ),
        ([{"role": "user", "content": "Hi", "name": "bob"}], [{"role": "user", "content": "Hi"}]),
    ],
)
def test_messages_are_normalised(messages: list[dict[str, Any]], sent: list[dict[str, str]]) -> None:
    """developer becomes system, text parts are joined, extra message fields are dropped."""
    chat = parse_chat_request({"messages": messages}, max_tokens_cap=CAP)
    assert chat.messages == sent


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 2}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"model": 5}, "model"),
    ],
)
def test_invalid_chat_requests_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    """Schema errors and unsupported combinations raise InvalidRequest naming the field (400 upstream of us)."""
    payload = {"messages": USER, **fields}
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request(payload, max_tokens_cap=CAP)
    assert err.value.param == param


@pytest.mark.parametrize("payload", [[], "x", None, 3])
def test_chat_body_must_be_an_object(payload: Any) -> None:
    """A body that is not a JSON object is refused."""
    with pytest.raises(InvalidRequest):
        parse_chat_request(payload, max_tokens_cap=CAP)


@pytest.mark.parametrize(
    ("answer", "texts", "reasons", "usage"),
    [
        ({"output": "Hello"}, ["Hello"], [None], None),
        ({"output": ["a", "b"]}, ["a", "b"], [None, None], None),
        ([{"0": "Hello"}], ["Hello"], [None], None),
        ([{"0": "a"}, {"0": "b"}], ["a", "b"], [None, None], None),
        ({"0": "a", "1": "b"}, ["a", "b"], [None, None], None),
        ([{"0": "a", "1": "b"}], ["a", "b"], [None, None], None),
        (["Hello"], ["Hello"], [None], None),
        ("Hello", ["Hello"], [None], None),
        ([{"generated_text": "Hello"}], ["Hello"], [None], None),
        ([[{"generated_text": "Hello"}]], ["Hello"], [None], None),
        (
            [{"generated_text": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
            ["Hello"],
            [None],
            None,
        ),
        ({"predictions": [{"0": "Hello"}]}, ["Hello"], [None], None),
        (
            [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
            ["a", "b"],
            [None, None],
            None,
        ),
        (
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            },
            ["Hello"],
            ["length"],
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        ),
        (
            {
                "choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            },
            ["a", "b"],
            ["stop", None],
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        ),
    ],
)
def test_answer_shapes_normalise(
    answer: Any, texts: list[str], reasons: list[str | None], usage: dict[str, int] | None
) -> None:
    """Every serving image's answer shape maps to texts, finish reasons and usage."""
    out = normalise_output(answer)
    assert (out.texts, out.finish_reasons, out.usage) == (texts, reasons, usage)


@pytest.mark.parametrize(
    "answer",
    [
        {},
        [],
        {"weird": 1},
        42,
        None,
        {"choices": []},
        {"choices": [{"message": {}}]},
        [{"role": "user", "content": "Hi"}],
    ],
)
def test_unknown_answer_shapes_are_upstream_errors(answer: Any) -> None:
    """An answer in no known shape is an UpstreamError (502), never a guess."""
    with pytest.raises(UpstreamError, match="unrecognised shape"):
        normalise_output(answer)


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello\n\nUser: more", ("\n\n",), ("Hello", True)),
        ("a STOP b END", ("END", "STOP"), ("a ", True)),
        ("no stops here", ("zzz",), ("no stops here", False)),
        ("anything", (), ("anything", False)),
    ],
)
def test_stop_sequences_cut_the_answer(text: str, stop: tuple[str, ...], expected: tuple[str, bool]) -> None:
    """The proxy cuts at the earliest stop sequence even when the image ignores `stop`."""
    assert apply_stop(text, stop) == expected


@pytest.mark.parametrize(
    ("input_string", "conversations"),
    [
        ([{"role": "user", "content": "Hi"}], 1),
        (
            [
                [{"role": "user", "content": "Hi"}],
                [{"role": "system", "content": "s"}, {"role": "user", "content": "Yo"}],
            ],
            2,
        ),
    ],
)
def test_score_accepts_both_input_forms_and_passes_them_on(input_string: list[Any], conversations: int) -> None:
    """The flat list of messages and the list of conversations both pass through unchanged."""
    payload = {
        "input_data": {
            "input_string": input_string,
            "parameters": {
                "temperature": 0.6,
                "top_p": 0.9,
                "do_sample": True,
                "max_new_tokens": 9000,
                "repetition_penalty": 1.1,
            },
        },
        "params": {"seed": 1},
    }
    request = parse_score_request(payload, max_tokens_cap=CAP)
    assert request.conversations == conversations
    assert request.body == {
        "input_data": {
            "input_string": input_string,
            "parameters": {
                "temperature": 0.6,
                "top_p": 0.9,
                "do_sample": True,
                "max_new_tokens": CAP,
                "repetition_penalty": 1.1,
            },
        },
        "params": {"seed": 1},
    }


def test_score_without_parameters_gets_the_default_token_budget() -> None:
    """No parameters: max_new_tokens is set to the default, and the selector field is taken out of the body."""
    request = parse_score_request({"model": "r1", "input_data": {"input_string": USER}}, max_tokens_cap=CAP)
    assert request.model == "r1"
    assert request.body == {"input_data": {"input_string": USER, "parameters": {"max_new_tokens": 256}}, "params": {}}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "input_data"),
        ({"input_data": {"input_string": []}}, "input_data.input_string"),
        ({"input_data": {"input_string": [USER[0], USER]}}, "input_data.input_string"),
        ({"input_data": {"input_string": [[]]}}, "input_data.input_string[0]"),
        ({"input_data": {"input_string": [{"role": "user"}]}}, "input_data.input_string[0]"),
        ({"input_data": {"input_string": USER, "parameters": []}}, "input_data.parameters"),
        (
            {"input_data": {"input_string": USER, "parameters": {"max_new_tokens": 0}}},
            "input_data.parameters.max_new_tokens",
        ),
        ({"input_data": {"input_string": USER, "parameters": {"temperature": 9}}}, "input_data.parameters.temperature"),
        ({"input_data": {"input_string": [USER] * 17}}, "input_data.input_string"),
        ({"input_data": {"input_string": USER, "parameters": {"num_beams": 5}}}, "input_data.parameters.num_beams"),
        ({"input_data": {"input_string": USER, "parameters": {"num_beams": True}}}, "input_data.parameters.num_beams"),
        (
            {"input_data": {"input_string": USER, "parameters": {"max_new_tokens": 4, "min_new_tokens": 5}}},
            "input_data.parameters.min_new_tokens",
        ),
        ({"input_data": {"input_string": USER, "parameters": {"top_k": -1}}}, "input_data.parameters.top_k"),
        (
            {"input_data": {"input_string": USER, "parameters": {"eos_token_id": 2}}},
            "input_data.parameters.eos_token_id",
        ),
        ({"input_data": {"input_string": USER}, "params": {"num_beams": 64}}, "params.num_beams"),
        ({"input_data": {"input_string": USER, "parameters": {"do_sample": "yes"}}}, "input_data.parameters.do_sample"),
        ({"input_data": {"input_string": USER}, "params": []}, "params"),
    ],
)
def test_invalid_score_requests_name_the_field(payload: dict[str, Any], param: str) -> None:
    """Schema errors on /api/score name the offending field."""
    with pytest.raises(InvalidRequest) as err:
        parse_score_request(payload, max_tokens_cap=CAP)
    assert err.value.param == param


@pytest.mark.parametrize(
    ("authorization", "functions_key", "ok"),
    [
        ("Bearer key-one", None, True),
        ("bearer key-two", None, True),
        (None, "key-one", True),
        ("Bearer wrong", "key-two", True),
        ("Bearer wrong", None, False),
        ("Bearer key-one-and-more", None, False),
        ("Basic key-one", None, False),
        (None, "KEY-ONE", False),
    ],
)
def test_api_keys_accept_bearer_or_functions_key(
    authorization: str | None, functions_key: str | None, ok: bool
) -> None:
    """Either header carries the key; anything else is refused, without echoing what was sent."""
    keys = ApiKeys(["key-one", "key-two"])
    if ok:
        keys.check(authorization, functions_key)
        return
    with pytest.raises(Unauthorized) as err:
        keys.check(authorization, functions_key)
    assert "key-one" not in str(err.value) and "wrong" not in str(err.value)
    assert "key-one" not in repr(keys)


@pytest.mark.parametrize(("keys", "message"), [(["k"], "missing API key"), ([], "no API keys configured")])
def test_missing_keys_are_refused(keys: list[str], message: str) -> None:
    """No key sent, or no key configured: refused (the proxy fails closed)."""
    with pytest.raises(Unauthorized, match=message):
        ApiKeys(keys).check(None, None)
    with pytest.raises(Unauthorized):
        ApiKeys(keys).check("Bearer ", "")


def _ledger() -> MemoryLedger:
    now = datetime.now(UTC)
    return MemoryLedger(
        [
            live_record(
                "r-old", model_name="phi3-chat", version="1", endpoint="ep-a", live_at=now - timedelta(hours=2)
            ),
            live_record(
                "r-new", model_name="phi3-chat", version="2", endpoint="ep-b", live_at=now - timedelta(hours=1)
            ),
            live_record(
                "r-other", model_name="phi3-code", version="1", endpoint="ep-c", live_at=now - timedelta(hours=3)
            ),
            live_record("r-retired", model_name="phi3-gone", version="1", endpoint="ep-d", state=RunState.RETIRED),
        ]
    )


@pytest.mark.parametrize(
    ("selector", "run_id"),
    [
        (None, "r-new"),
        ("", "r-new"),
        ("default", "r-new"),
        ("phi3-chat", "r-new"),
        ("phi3-chat:1", "r-old"),
        ("r-old", "r-old"),
        ("phi3-code", "r-other"),
    ],
)
def test_model_selection(selector: str | None, run_id: str) -> None:
    """A model name picks its newest live run; name:version and run ids pick exactly; default is the newest."""
    model = asyncio.run(LiveModels(_ledger().list).resolve(selector))
    assert isinstance(model, LiveModel) and model.run_id == run_id


@pytest.mark.parametrize(
    ("selector", "message"), [("phi3-gone", "its run is retired"), ("nope", "does not exist or is not live")]
)
def test_unknown_or_retired_models_are_not_found(selector: str, message: str) -> None:
    """A retired or unknown model is a 404 that says why."""
    with pytest.raises(ModelNotFound, match=message):
        asyncio.run(LiveModels(_ledger().list).resolve(selector))


def test_no_live_model_is_unavailable() -> None:
    """With nothing live the default selection is 503-style NoLiveModel."""
    with pytest.raises(NoLiveModel):
        asyncio.run(LiveModels(MemoryLedger([]).list).resolve(None))


def test_live_table_is_cached_and_refreshed_in_the_background() -> None:
    """The ledger is read once per TTL, never per request; a stale table is served while it is re-read."""
    ledger = _ledger()
    now = [0.0]
    models = LiveModels(ledger.list, ttl_s=5.0, clock=lambda: now[0])

    async def scenario() -> list[str]:
        seen = [(await models.resolve(None)).run_id for _ in range(50)]
        assert ledger.reads == 1
        ledger.records.append(live_record("r-newest", model_name="phi3-chat", version="3", live_at=datetime.now(UTC)))
        now[0] = 6.0
        seen.append((await models.resolve(None)).run_id)  # stale answer, refresh started
        await asyncio.sleep(0.2)
        seen.append((await models.resolve(None)).run_id)
        return seen

    seen = asyncio.run(scenario())
    assert seen[-2] == "r-new" and seen[-1] == "r-newest"
    assert ledger.reads == 2


def test_ledger_failure_keeps_the_last_good_table() -> None:
    """If the ledger cannot be read, the last good table keeps serving (and nothing is served before one)."""
    calls = {"n": 0}
    records = _ledger().records

    def flaky() -> list[Any]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("storage down")
        return records

    now = [0.0]
    models = LiveModels(flaky, ttl_s=1.0, clock=lambda: now[0])

    async def scenario() -> str:
        await models.resolve(None)
        now[0] = 5.0
        await models.resolve(None)
        await asyncio.sleep(0.1)
        return (await models.resolve("phi3-code")).run_id

    assert asyncio.run(scenario()) == "r-other"
    with pytest.raises(NoLiveModel):
        asyncio.run(LiveModels(lambda: (_ for _ in ()).throw(ConnectionError("down"))).resolve(None))


def test_stream_is_openai_chunks_then_done() -> None:
    """The chunk events: role first, content deltas, the finish reason, the usage chunk when asked, [DONE]."""
    model = LiveModel("r1", "phi3-chat", "2", "ep", "blue", datetime.now(UTC))
    out = ChunkRenderer("chatcmpl-1", 5, model, include_usage=True)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    body = out.role() + out.content("Hel") + out.content("lo") + out.finish("length") + out.usage(usage)
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" and c["model"] == "phi3-chat" for c in chunks
    )
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        ({}, "length"),
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    ("pieces", "stop", "sent", "stopped"),
    [
        (["Hello wor", "ld\n\nmore"], ("\n\n",), "Hello world", True),
        (["a<", "/s", "> tail"], ("</s>",), "a", True),
        (["a<", "b> tail"], ("</s>",), "a<b> tail", False),
        (["no stop here"], (), "no stop here", False),
    ],
)
def test_stop_sequences_are_found_across_streamed_pieces(
    pieces: list[str], stop: tuple[str, ...], sent: str, stopped: bool
) -> None:
    """A stop sequence split over pieces still cuts the stream there; text that could start one is held back."""
    scanner = StopScanner(stop)
    out = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert (out, scanner.stopped) == (sent, stopped)


def test_a_whole_answer_is_cut_into_pieces_that_join_back() -> None:
    """An upstream that cannot stream: its text goes out in word-sized pieces, nothing lost or added."""
    text = "A fairly long answer with several words, some punctuation, and a trailing space "
    pieces = split_for_stream(text, size=10)
    assert len(pieces) > 3 and "".join(pieces) == text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"delta": "Hi"}\n', ("Hi", None, None)),
        (
            b'{"finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}',
            ("", "length", {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}),
        ),
    ],
)
def test_stream_events_parse(line: bytes, expected: tuple[Any, ...]) -> None:
    """NDJSON stream lines: text pieces, then the finish reason with the token counts."""
    event = parse_stream_event(line)
    assert (event.delta, event.finish_reason, event.usage) == expected


@pytest.mark.parametrize(
    "line", [b"not json", b"[1]", b'{"delta": 5}', b'{"finish_reason": "tired"}', b'{"error": "OOM"}']
)
def test_bad_stream_events_are_upstream_errors(line: bytes) -> None:
    """A line that is not a known event, or an upstream's error line, is an UpstreamError."""
    with pytest.raises(UpstreamError):
        parse_stream_event(line)

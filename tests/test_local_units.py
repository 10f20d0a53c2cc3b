"""Local backend pieces without a model: parameters, Event Grid events and outbox, routing, scoring input."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.domain.resources import job_state_from_run_status
from shared.domain.sidecar import FINETUNE_PARAMS
from shared.errors import InvalidInput
from tests.tiny_model import event_sink
from tunegrid.local.events import LOCAL_TOPIC, RUN_COMPLETED, RUN_STATUS_CHANGED, Outbox, run_events
from tunegrid.local.params import LOCAL_DEFAULTS, resolve_train_config
from tunegrid.local.router import authorized, pick_deployment
from tunegrid.local.server import BadRequest, generation_kwargs, parse_score_request


def test_local_defaults_use_component_names() -> None:
    """Every local default is a chat_completion_pipeline input name, so one sidecar drives both backends."""
    assert set(LOCAL_DEFAULTS) <= set(FINETUNE_PARAMS)


@pytest.mark.parametrize(
    ("params", "field", "expected"),
    [
        ({}, "max_steps", -1),
        ({"max_steps": 12}, "max_steps", 12),
        ({"learning_rate": 5e-6}, "learning_rate", 5e-6),
        ({"merge_lora_weights": "false"}, "merge_lora_weights", False),
        ({"apply_lora": True}, "apply_lora", True),
        ({"optim": "adamw_hf"}, "optim", "adamw_torch"),
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type", "cosine"),
        ({"apply_deepspeed": "true", "deepspeed_stage": "2"}, "ignored", ("apply_deepspeed", "deepspeed_stage")),
        ({"max_seq_length": -1}, "max_seq_length", -1),
    ],
)
def test_train_config_from_component_parameters(params: dict, field: str, expected: object) -> None:
    """Sidecar values override the local defaults; Azure-only inputs are listed as ignored."""
    assert getattr(resolve_train_config(params), field) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"lr_scheduler_type": "warmup_then_sleep"},
        {"max_steps": 0},
        {"per_device_train_batch_size": 0},
        {"lora_dropout": 1.5},
        {"learning_rate": "fast"},
        {"max_seq_length": 0},
        {"merge_lora_weights": "maybe"},
    ],
)
def test_bad_parameters_are_refused(params: dict) -> None:
    """A value the trainer cannot use is an InvalidInput at submit time, not a crash later."""
    with pytest.raises(InvalidInput):
        resolve_train_config(params)


@pytest.mark.parametrize(
    ("status", "types"),
    [
        ("Running", [RUN_STATUS_CHANGED]),
        ("Completed", [RUN_STATUS_CHANGED, RUN_COMPLETED]),
        ("Failed", [RUN_STATUS_CHANGED]),
    ],
)
def test_run_events_have_the_azure_ml_shape(status: str, types: list[str]) -> None:
    """RunStatusChanged on every change, RunCompleted on success only, with Azure ML's data fields."""
    events = run_events(
        run_id="job-1",
        run_status=status,
        experiment_name="exp",
        run_tags={"tunegridrunid": "r1"},
        run_properties={"p": "v"},
    )
    assert [e["eventType"] for e in events] == types
    for event in events:
        data = event["data"]
        assert event["subject"] == f"experiments/{data['experimentId']}/runs/job-1"
        assert event["topic"] == LOCAL_TOPIC
        assert data["runId"] == "job-1" and data["runType"] == "azureml.PipelineRun"
        assert data["runTags"] == {"tunegridrunid": "r1"} and data["runProperties"] == {"p": "v"}
        assert event["dataVersion"] and event["id"]
    assert events[0]["data"]["runStatus"] == status
    assert job_state_from_run_status(events[0]["data"]["runStatus"]).value == status.lower()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_outbox_keeps_events_until_the_webhook_answers(tmp_path: Path) -> None:
    """Undeliverable events stay on disk and go out, in order and once, when the webhook comes up."""
    port = _closed_port()
    outbox = Outbox(
        tmp_path / "outbox",
        webhook_url=f"http://127.0.0.1:{port}/runtime/webhooks/eventgrid?functionName=job_events",
        key="k1",
    )
    first = run_events(run_id="j", run_status="Running", experiment_name="e", run_tags={}, run_properties={})
    second = run_events(run_id="j", run_status="Completed", experiment_name="e", run_tags={}, run_properties={})
    outbox.put(first + second)
    down = outbox.deliver()
    assert down.sent == 0 and down.pending == 3 and down.error
    with event_sink("k1", port=port) as sink:
        up = outbox.deliver()
        assert up.sent == 3 and up.pending == 0
        assert [e["id"] for e in sink.events] == [e["id"] for e in first + second]
        assert outbox.deliver().sent == 0
        headers = {k.lower(): v for k, v in sink.deliveries[0].headers.items()}
        assert headers["aeg-event-type"] == "Notification"
        assert sink.deliveries[0].path.endswith("functionName=job_events")


def test_outbox_dead_letters_events_the_webhook_refuses(tmp_path: Path) -> None:
    """A 4xx (here a wrong aeg-sas-key) will not get better: the event moves to outbox/dead."""
    with event_sink("right-key") as sink:
        outbox = Outbox(tmp_path / "outbox", webhook_url=sink.url, key="wrong-key")
        outbox.put(run_events(run_id="j", run_status="Running", experiment_name="e", run_tags={}, run_properties={}))
        result = outbox.deliver()
    assert result.dead == 1 and result.pending == 0
    assert len(list((tmp_path / "outbox" / "dead").glob("*.json"))) == 1


@pytest.mark.parametrize(
    ("traffic", "draw", "expected"),
    [
        ({"blue": 100}, 99.9, "blue"),
        ({"blue": 0, "green": 100}, 0.0, "green"),
        ({"blue": 30, "green": 70}, 29.9, "blue"),
        ({"blue": 30, "green": 70}, 30.0, "green"),
        ({"blue": 0, "green": 0}, 50.0, None),
        ({}, 1.0, None),
    ],
)
def test_traffic_draw(traffic: dict, draw: float, expected: str | None) -> None:
    """A request goes to the deployment whose share covers the draw; all zero means none."""
    assert pick_deployment(traffic, draw=draw) == expected


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer primary-k", True),
        ("Bearer secondary-k", True),
        ("bearer primary-k", True),
        ("Bearer nope", False),
        ("primary-k", False),
        (None, False),
        ("Bearer ", False),
    ],
)
def test_key_auth(header: str | None, ok: bool) -> None:
    """Either key works as a bearer token; anything else is refused."""
    assert authorized({"keys": {"primary": "primary-k", "secondary": "secondary-k"}}, header) is ok


@pytest.mark.parametrize(
    ("body", "conversations", "several"),
    [
        (
            {"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {}}, "params": {}},
            1,
            False,
        ),
        ({"input_data": {"input_string": [{"role": "user", "content": "hi"}]}}, 1, False),
        (
            {"input_data": {"input_string": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]}},
            2,
            True,
        ),
    ],
    ids=["seed-notebook", "flat-vllm", "two-conversations"],
)
def test_scoring_request_shapes(body: dict, conversations: int, several: bool) -> None:
    """Both the seed notebook's nested list and the flat message list are accepted."""
    parsed, many, _ = parse_score_request(body)
    assert len(parsed) == conversations and many is several


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input_data": {}},
        {"input_data": {"input_string": []}},
        {"input_data": {"input_string": [[{"role": "robot", "content": "x"}]]}},
        [1, 2],
    ],
)
def test_bad_scoring_requests(body: object) -> None:
    """Malformed scoring bodies are a 400 with a reason, never a crash."""
    with pytest.raises(BadRequest):
        parse_score_request(body)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200},
            {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 200},
        ),
        ({"temperature": 0}, {"do_sample": False, "max_new_tokens": 128}),
        ({"max_tokens": 5000}, {"max_new_tokens": 2048}),
        ({"do_sample": "false", "temperature": 0.9}, {"do_sample": False}),
    ],
)
def test_generation_parameters(params: dict, expected: dict) -> None:
    """The seed notebook's parameters map onto generate(); max tokens are capped."""
    kwargs = generation_kwargs(params, pad_token_id=0)
    assert {k: kwargs[k] for k in expected} == expected


@pytest.mark.parametrize("argv", [["local-jobs"], ["local-endpoints"], ["local-endpoints", "--json"]])
def test_local_commands_on_an_empty_workspace(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The local-* commands work on a fresh workspace and print no secrets."""
    from tunegrid.cli import main

    monkeypatch.setenv("LOCAL_WORKSPACE_DIR", str(tmp_path / "ws"))
    monkeypatch.setenv("LOCAL_EVENT_WEBHOOK_URL", "")
    assert main(argv) == 0
    assert "local-dev-event-key" not in capsys.readouterr().out


def test_unknown_local_job_is_a_negative_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a job that does not exist exits 1."""
    from tunegrid.cli import main

    monkeypatch.setenv("LOCAL_WORKSPACE_DIR", str(tmp_path / "ws"))
    assert main(["local-jobs", "no-such-job"]) == 1


def test_local_model_must_resolve_under_a_root(tmp_path: Path) -> None:
    """The local backend checks the resolved folder: a symlink under LOCAL_MODEL_ROOTS that leads out of it,
    a file, or any folder when no root is set is refused before a trainer starts; the built-ins always pass."""
    from shared.domain.resources import DataRef, FineTuneRequest
    from shared.domain.sidecar import LOCAL_BUILTIN_MODELS
    from tunegrid.local.backend import LocalBackend
    from tunegrid.local.base_models import BUILTINS

    assert tuple(BUILTINS) == LOCAL_BUILTIN_MODELS
    roots = tmp_path / "models"
    (roots / "mine").mkdir(parents=True)
    (roots / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (roots / "file").write_text("not a model")
    backend = LocalBackend(tmp_path / "ws", webhook_url=None, model_roots=(str(roots),))
    unrooted = LocalBackend(tmp_path / "ws2", webhook_url=None)
    data = DataRef("prepared-data", "r/train.jsonl", "file:///nowhere")

    def findings(b: LocalBackend, model: str) -> list[str]:
        request = FineTuneRequest(
            run_id="r0",
            job_name="tunegrid-r0",
            dataset="d.jsonl",
            train=data,
            test=data,
            base_model="x",
            local_model=model,
        )
        return [f.code for f in b.check_finetune(request)]

    assert findings(backend, str(roots / "mine")) == []
    assert findings(backend, "tiny-phi3") == [] and findings(unrooted, "smollm2") == []
    for bad in (str(roots / "escape"), str(roots / "file"), "/etc", str(roots / ".." / "elsewhere")):
        assert findings(backend, bad) == ["invalid_local_model"], bad
    assert findings(unrooted, str(roots / "mine")) == ["invalid_local_model"]

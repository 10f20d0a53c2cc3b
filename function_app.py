"""Composition root: logging set-up, one FunctionApp, one blueprint per trigger. Nothing else."""

from __future__ import annotations

import logging
import os

import azure.functions as func

from functions.chat import bp as chat_bp
from functions.ingest import bp as ingest_bp
from functions.janitor import bp as janitor_bp
from functions.job_events import bp as job_events_bp
from functions.rollout_tick import bp as rollout_tick_bp
from functions.runs import bp as runs_bp

if os.environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
    from azure.monitor.opentelemetry import configure_azure_monitor

    configure_azure_monitor(logger_name="shared")
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(ingest_bp)
app.register_functions(job_events_bp)
app.register_functions(rollout_tick_bp)
app.register_functions(chat_bp)
app.register_functions(runs_bp)
app.register_functions(janitor_bp)

"""Tracing configuration: off unless an endpoint is set, and an endpoint the exporter would misread is refused."""

from __future__ import annotations

import pytest

from subnet.envconfig import ConfigError, from_env
from subnet.telemetry import TracingConfig, tracer_provider


def test_no_endpoint_means_no_provider_and_no_console_output(capsys):
    assert tracer_provider(from_env(TracingConfig, {}), "router") is None
    assert capsys.readouterr().out == ""


def test_an_endpoint_without_a_scheme_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="needs a scheme: http://host:4317"):
        from_env(TracingConfig, {"OTEL_EXPORTER_OTLP_ENDPOINT": "otel-collector:4317"})
    config = from_env(TracingConfig, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317"})
    assert config.otlp_endpoint == "http://otel-collector:4317" and config.service_name == ""

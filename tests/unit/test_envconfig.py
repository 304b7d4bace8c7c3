"""subnet.envconfig and the expert service's config built on it."""

from dataclasses import FrozenInstanceError, dataclass

import pytest

from services.expert.config import ExpertConfig
from subnet.envconfig import REQUIRED, ConfigError, env, from_env, markdown_table, nested


@dataclass(frozen=True)
class Demo:
    name: str = env("DEMO_NAME", REQUIRED, "who")
    port: int = env("DEMO_PORT", 8080, "a port")
    wait_ms: float = env("DEMO_WAIT_MS", 1.5, "how long")
    verbose: bool = env("DEMO_VERBOSE", False, "chatty")
    tags: tuple[str, ...] = env("DEMO_TAGS", (), "labels")


def test_values_are_parsed_by_type_and_defaults_fill_the_rest():
    c = from_env(Demo, {"DEMO_NAME": "x", "DEMO_PORT": " 9 ", "DEMO_VERBOSE": "true", "DEMO_TAGS": "a, b,"})
    assert c == Demo(name="x", port=9, wait_ms=1.5, verbose=True, tags=("a", "b"))
    with pytest.raises(FrozenInstanceError):
        c.port = 1


@pytest.mark.parametrize("environ,message", [
    ({}, "DEMO_NAME is required but not set: who"),
    ({"DEMO_NAME": "  "}, "DEMO_NAME is required"),
    ({"DEMO_NAME": "x", "DEMO_PORT": "abc"}, "DEMO_PORT='abc' is not an int"),
    ({"DEMO_NAME": "x", "DEMO_WAIT_MS": "soon"}, "DEMO_WAIT_MS='soon' is not a float"),
    ({"DEMO_NAME": "x", "DEMO_VERBOSE": "maybe"}, "DEMO_VERBOSE='maybe' is not a bool"),
    ({"DEMO_NAME": "x", "DEMO_WAIT_MS": "nan"}, "DEMO_WAIT_MS='nan' is not a finite number"),
    ({"DEMO_NAME": "x", "DEMO_WAIT_MS": "-inf"}, "DEMO_WAIT_MS='-inf' is not a finite number"),
    ({"DEMO_NAME": "x", "DEMO_WAIT_MS": "1e400"}, "DEMO_WAIT_MS='1e400' is not a finite number"),
])
def test_bad_values_fail_with_the_variable_name(environ, message):
    with pytest.raises(ConfigError) as info:
        from_env(Demo, environ)
    assert message in str(info.value)


@dataclass(frozen=True)
class Inner:
    tags: tuple[str, ...] = env("INNER_TAGS", (), "labels")


@dataclass(frozen=True)
class Outer:
    size_mb: int = env("OUTER_SIZE_MB", 1, "a size")
    inner: Inner = nested(Inner)


def test_nested_config_is_read_from_the_same_environment_and_listed():
    c = from_env(Outer, {"OUTER_SIZE_MB": "3", "INNER_TAGS": "a,b"})
    assert c.size_mb == 3 and c.inner.tags == ("a", "b")
    assert Outer().inner.tags == ()
    table = markdown_table(Outer)
    assert "`OUTER_SIZE_MB`" in table and "| `INNER_TAGS` | list | (empty) | labels |" in table


def test_markdown_table_lists_every_variable():
    table = markdown_table(Demo)
    assert "| `DEMO_NAME` | str | **required** | who |" in table
    assert "| `DEMO_PORT` | int | `8080` | a port |" in table
    assert table.count("\n") == 2 + 5


def test_expert_config_requires_uids_and_checks_them():
    with pytest.raises(ConfigError, match="EXPERT_UIDS is required"):
        from_env(ExpertConfig, {})
    with pytest.raises(ConfigError, match="EXPERT_UIDS: expert uid must look like"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0,zero"})
    with pytest.raises(ConfigError, match="EXPERT_DIM=0 must be positive"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": "0"})
    with pytest.raises(ConfigError, match="EXPERT_WIRE_DTYPES"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_WIRE_DTYPES": "fp32,fp64"})
    c = from_env(ExpertConfig, {"EXPERT_UIDS": "0.0,1.2", "EXPERT_MAX_MESSAGE_MB": "2"})
    assert c.uids == ("0.0", "1.2") and c.max_message_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize("name", ["AUTH_WINDOW_S", "EXPERT_ACTIVATION_TTL_S", "EXPERT_BATCH_WAIT_MS",
                                  "EXPERT_MAX_MESSAGE_MB", "S3_MAX_OBJECT_MB"])
def test_a_nan_in_a_real_service_variable_is_refused(name):
    """A NaN passed every `<= 0` check: AUTH_WINDOW_S=nan accepted any timestamp (replays included)."""
    with pytest.raises(ConfigError, match=f"{name}='nan' is not a finite number"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", name: "nan"})


@pytest.mark.parametrize("name,value,message", [
    ("EXPERT_LOG_LEVEL", "bogus", "EXPERT_LOG_LEVEL='bogus' is not a logging level"),
    ("EXPERT_DEVICE", "bogus", "EXPERT_DEVICE='bogus' is not a torch device"),
    ("EXPERT_DEVICE", "meta", "only cpu and cuda devices"),
    ("REDIS_URL", "garbage", "REDIS_URL='garbage' is not a Redis URL"),
    ("AUTH_REDIS_URL", "redis://host:port", "AUTH_REDIS_URL='redis://host:port' is not a Redis URL"),
    ("EXPERT_MAX_MESSAGE_MB", "3000", "EXPERT_MAX_MESSAGE_MB=3000 must be in (0, 2047]"),
])
def test_expert_settings_that_failed_late_are_refused_at_start(name, value, message):
    """Each of these started a service that then failed with a traceback (a bad log level or device at
    start, a bad Redis URL on every call, a save path at SIGTERM, losing the trained weights)."""
    with pytest.raises(ConfigError) as info:
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", name: value})
    assert message in str(info.value)


def test_widths_timeouts_and_budgets_that_cannot_work_are_refused():
    from services.stack.config import StackConfig
    from subnet.object_store import S3Config

    with pytest.raises(ConfigError, match="EXPERT_DIM=1000000000 is larger than any model here"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": "1000000000"})
    with pytest.raises(ConfigError, match="STACK_EXPERT_TIMEOUT_S=-1.0 .* must be positive"):
        from_env(StackConfig, {"STACK_EXPERT_TIMEOUT_S": "-1"})
    with pytest.raises(ConfigError, match="S3_CONNECT_TIMEOUT_S=0.0 .* must be positive"):
        from_env(S3Config, {"S3_CONNECT_TIMEOUT_S": "0"})

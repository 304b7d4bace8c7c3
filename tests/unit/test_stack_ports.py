"""Which ports the local stack checks, per mode: `serve` starts no adversary, validator or scorer."""

import pytest

from services.stack.__main__ import stack_ports
from services.stack.config import StackConfig
from services.stack.miners import plan_miners
from subnet.envconfig import from_env

# The adversaries of `demo` take the ports after the last honest one: 15063 and 15064 here.
COLLIDES_WITH_AN_ADVERSARY = {"STACK_EXPERT_PORTS": "15061,15062", "STACK_ADVERSARIES": "lazy,copycat",
                              "STACK_REDIS_PORT": "15063", "STACK_METRICS_BASE_PORT": "0"}


def ports_of(mode: str, env: dict[str, str]) -> dict[str, int]:
    cfg = from_env(StackConfig, env)
    demo = mode == "demo"
    return stack_ports(cfg, plan_miners(cfg.ports, cfg.adversaries if demo else ()), demo)


def test_serve_does_not_count_ports_of_adversaries_it_does_not_start():
    ports = ports_of("serve", COLLIDES_WITH_AN_ADVERSARY)
    assert ports["redis"] == 15063
    assert not any(name.startswith(("lazy", "copycat")) for name in ports)


def test_demo_names_both_users_of_a_shared_port():
    with pytest.raises(ValueError, match=r"port 15063 for redis and lazy-0\b"):
        ports_of("demo", COLLIDES_WITH_AN_ADVERSARY)


def test_metrics_ports_count_the_validator_and_scorer_in_demo_only():
    env = {"STACK_EXPERT_PORTS": "15061,15062", "STACK_ADVERSARIES": "", "STACK_METRICS_BASE_PORT": "9100",
           "STACK_ROUTER_PORT": "9103"}
    # router 9100, expert-0 9101, expert-1 9102: serve leaves 9103 to the router's gRPC port...
    assert ports_of("serve", env)["expert-1 metrics"] == 9102
    # ...and demo's validator metrics take it.
    with pytest.raises(ValueError, match="port 9103 for router and validator metrics"):
        ports_of("demo", env)


def test_a_repeated_expert_port_is_refused_in_either_mode():
    for mode in ("serve", "demo"):
        with pytest.raises(ValueError, match="port 15061 for expert-0 and expert-1"):
            ports_of(mode, {"STACK_EXPERT_PORTS": "15061,15061", "STACK_ADVERSARIES": ""})


def test_out_of_range_ports_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="1..65535"):
        from_env(StackConfig, {"STACK_ROUTER_PORT": "70000"})
    with pytest.raises(ValueError, match="above 65535"):
        ports_of("demo", {"STACK_EXPERT_PORTS": "65535", "STACK_ADVERSARIES": "lazy",
                          "STACK_METRICS_BASE_PORT": "0"})

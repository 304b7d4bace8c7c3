"""tests/deploy/declared.py SERVICES stays what the services themselves say they read."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.deploy.declared import SERVICES, declared_variables, service_module


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_services_match_their_env_tables(module, capsys):
    """`python -m <service> --env-table` (the README's table) lists exactly the variables of the
    config classes SERVICES names for it: a class added to a service needs its entry here too."""
    assert importlib.import_module(f"{module}.__main__").main(["--env-table"]) == 0
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", capsys.readouterr().out, re.M))
    assert table, f"{module} --env-table printed no variables"
    declared = set(declared_variables(module, indirect=False))
    assert table == declared, (f"{module}: --env-table has {sorted(table - declared)} that SERVICES' classes lack, "
                               f"and SERVICES' classes have {sorted(declared - table)} that --env-table lacks")


def test_service_module_reads_plain_and_shell_commands():
    assert service_module(["python", "-m", "services.expert"]) == "services.expert"
    assert service_module(["sh", "-c", "test -f x || exec python -m services.router init --out y"]) == "services.router"
    assert service_module(["redis-server", "--appendonly", "yes"]) is None
    assert service_module(["python", "-m", "subnet.health_probe", "127.0.0.1:1"]) is None
    assert service_module("python -m subnet.identity dev-wallet && python -m subnet.chain register") == "subnet.chain"

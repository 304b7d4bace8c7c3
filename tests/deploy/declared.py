"""What the code declares, read at test time, for the deploy files to be checked against.

SERVICES lists, for every service module a container may run, the config dataclasses it
reads from its environment and the variables that hold its ports. Deploying a new service
(the validator, the scorer) means adding one entry here; the tests then hold its compose
service and its Kubernetes containers to what its code declares, and
test_services_match_their_env_tables keeps the entry equal to the service's `--env-table`.

Metrics are found the same way: every prometheus_client Counter/Gauge/Histogram/Summary
created with a literal name anywhere under services/ or subnet/.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from subnet.envconfig import ConfigError, EnvVar, from_env, variables

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Service:
    """One deployable service: `python -m <module>`."""

    configs: tuple[str, ...]          # "module:Class" of every config dataclass it reads from the environment
    # Config classes it reads besides those, which its --env-table does not list (yet).
    indirect: tuple[str, ...] = ()
    grpc_port: str | None = None      # the variable holding its gRPC port
    metrics_port: str | None = None   # the variable holding its Prometheus port
    bind_host: str | None = None      # the variable holding the address it binds (0.0.0.0 in containers)
    health_service: str | None = None  # the grpc.health.v1 service name that means "ready"


# With AUTH_CHAIN=1, subnet.auth.config.open_auth_chain reads the chain's own variables
# (CHAIN_*, ROUND_*) from the environment, though no service's --env-table lists them.
_AUTH_CHAIN = ("subnet.chain.config:ChainConfig", "subnet.rounds:RoundConfig")

SERVICES: dict[str, Service] = {
    "services.expert": Service(
        configs=("services.expert.config:ExpertConfig",),
        grpc_port="EXPERT_PORT", metrics_port="EXPERT_METRICS_PORT", bind_host="EXPERT_HOST",
        health_service="moe.v1.Expert"),
    "services.router": Service(
        configs=("services.router.config:RouterConfig",),
        grpc_port="ROUTER_PORT", metrics_port="ROUTER_METRICS_PORT", bind_host="ROUTER_HOST",
        health_service="moe.v1.Router"),
    "services.scorer": Service(
        configs=("services.scorer.config:ScorerConfig",), metrics_port="SCORER_METRICS_PORT",
        bind_host="SCORER_METRICS_HOST"),
    "services.validator": Service(
        configs=("services.validator.config:ValidatorConfig",), metrics_port="VALIDATOR_METRICS_PORT",
        bind_host="VALIDATOR_HOST"),
}

# Command-line tools the deploy files run as one-shots (no --env-table, no ports).
TOOLS: dict[str, Service] = {
    "subnet.chain": Service(configs=_AUTH_CHAIN),
}

# The gRPC health probe every container healthcheck runs (see subnet/health_probe.py).
HEALTH_PROBE_MODULE = "subnet.health_probe"
# Paths of our image (Dockerfile): the user it runs as, and where a read-only root needs writable mounts.
IMAGE_HOME = "/home/app"


def _entry(module: str) -> Service:
    return SERVICES[module] if module in SERVICES else TOOLS[module]


def config_classes(module: str, indirect: bool = True) -> list[type]:
    entry = _entry(module)
    out = []
    for ref in entry.configs + (entry.indirect if indirect else ()):
        mod, _, name = ref.partition(":")
        out.append(getattr(importlib.import_module(mod), name))
    return out


def declared_variables(module: str, indirect: bool = True) -> dict[str, EnvVar]:
    """Every environment variable the service reads, by name (`indirect=False`: only those of its --env-table)."""
    return {var.name: var for cls in config_classes(module, indirect) for var in variables(cls)}


def service_module(command: str | Iterable[str] | None) -> str | None:
    """The service or tool module a container command runs (`python -m services.expert`, also
    inside `sh -c "..."`, the last one there), or None for anything else."""
    if command is None:
        return None
    text = command if isinstance(command, str) else " ".join(command)
    found = [m for m in re.findall(r"(?:^|\s)-m\s+([a-z_]+(?:\.[a-z_]+)+)\b", text)
             if m.startswith("services.") or m in TOOLS]
    return found[-1] if found else None


def command_args(command: str | Iterable[str]) -> list[str]:
    """The words of a command, `sh -c "..."` scripts split too."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if len(words) >= 3 and words[0] in ("sh", "bash") and words[1] == "-c":
        return words[:2] + shlex.split(words[2])
    return words


def option(words: list[str], flag: str) -> str | None:
    """The value after `flag` in `words` (None when absent)."""
    for i, word in enumerate(words[:-1]):
        if word == flag:
            return words[i + 1]
    return None


def environment_problems(module: str, environ: Mapping[str, str], where: str) -> list[str]:
    """Why `environ` is not a valid environment for `module`: variables it does not declare,
    required ones missing, and values its config classes refuse."""
    if module not in SERVICES and module not in TOOLS:
        return [f"{where}: runs {module}, which tests/deploy/declared.py SERVICES does not list; add its entry"]
    declared = declared_variables(module)
    problems = [f"{where}: sets {name}, which {module} does not read (see its --env-table)"
                for name in sorted(set(environ) - set(declared))]
    problems += [f"{where}: does not set {name}, which {module} requires"
                 for name, var in sorted(declared.items()) if var.required and not environ.get(name, "").strip()]
    if not problems:
        for cls in config_classes(module):
            try:
                from_env(cls, dict(environ))
            except ConfigError as e:
                problems.append(f"{where}: {cls.__name__} refuses the values: {e}")
    return problems


def proto_service_names() -> set[str]:
    """Full names of the gRPC services in protos/ (from the generated descriptors)."""
    names = set()
    for path in sorted((ROOT / "subnet" / "wire" / "v1").glob("*_pb2.py")):
        module = importlib.import_module(f"subnet.wire.v1.{path.stem}")
        names.update(s.full_name for s in module.DESCRIPTOR.services_by_name.values())
    return names


# --- Prometheus metrics defined in the code -------------------------------------------------------

_METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
# Series Prometheus itself adds to every target, and the labels it (or relabeling) attaches.
BUILTIN_SERIES = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}
TARGET_LABELS = {"job", "instance", "pod", "namespace"}


@dataclass(frozen=True)
class MetricDef:
    name: str          # as passed to the constructor (namespace/subsystem applied)
    kind: str          # Counter, Gauge, ...
    labels: tuple[str, ...]
    where: str

    def series(self) -> dict[str, set[str]]:
        """Exposed sample names -> their label names, as prometheus_client writes them."""
        labels = set(self.labels)
        if self.kind == "Counter":
            base = self.name[: -len("_total")] if self.name.endswith("_total") else self.name
            return {f"{base}_total": labels, f"{base}_created": labels}
        if self.kind == "Histogram":
            return {f"{self.name}_bucket": labels | {"le"}, f"{self.name}_count": labels,
                    f"{self.name}_sum": labels, f"{self.name}_created": labels}
        if self.kind == "Summary":
            return {self.name: labels | {"quantile"}, f"{self.name}_count": labels,
                    f"{self.name}_sum": labels, f"{self.name}_created": labels}
        if self.kind == "Info":
            return {f"{self.name}_info": labels}
        if self.kind == "Enum":
            return {self.name: labels | {self.name}}
        return {self.name: labels}


def _literal(node: ast.AST | None):
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


# What prometheus_client's collectors register when a file calls them (name, kind), as they name them.
COLLECTOR_SERIES = {"ProcessCollector": (
    ("process_virtual_memory_bytes", "Gauge"), ("process_resident_memory_bytes", "Gauge"),
    ("process_start_time_seconds", "Gauge"), ("process_cpu_seconds_total", "Counter"),
    ("process_open_fds", "Gauge"), ("process_max_fds", "Gauge"))}


def metric_definitions_in_source(source: str, where: str = "<source>") -> list[MetricDef]:
    """Metrics constructed with literal names in one Python file (names imported from prometheus_client only)."""
    tree = ast.parse(source)
    local_names: dict[str, str] = {}   # name in this file -> prometheus_client type
    module_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
            for alias in node.names:
                if alias.name in _METRIC_TYPES or alias.name in COLLECTOR_SERIES:
                    local_names[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            module_aliases.update(a.asname or a.name for a in node.names if a.name == "prometheus_client")
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, kind = node.func, None
        if isinstance(func, ast.Name):
            kind = local_names.get(func.id)
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id in module_aliases and func.attr in _METRIC_TYPES):
            kind = func.attr
        if kind is None:
            continue
        if kind in COLLECTOR_SERIES:
            found += [MetricDef(name, metric_kind, (), f"{where}:{node.lineno}")
                      for name, metric_kind in COLLECTOR_SERIES[kind]]
            continue
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        name = _literal(node.args[0] if node.args else kwargs.get("name"))
        if not isinstance(name, str):
            continue
        parts = [_literal(kwargs.get("namespace")) or "", _literal(kwargs.get("subsystem")) or "", name]
        labels = _literal(node.args[2] if len(node.args) > 2 else kwargs.get("labelnames")) or ()
        found.append(MetricDef("_".join(p for p in parts if p), kind, tuple(labels),
                               f"{where}:{node.lineno}"))
    return found


def metric_definitions() -> list[MetricDef]:
    out = []
    for top in ("services", "subnet"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text()
            if "prometheus_client" in text:
                out += metric_definitions_in_source(text, str(path.relative_to(ROOT)))
    return out


def exposed_series() -> dict[str, set[str]]:
    """Every sample name the services can expose (plus Prometheus' own), with its label names."""
    series: dict[str, set[str]] = {name: set(labels) for name, labels in BUILTIN_SERIES.items()}
    for metric in metric_definitions():
        for name, labels in metric.series().items():
            series.setdefault(name, set()).update(labels)
    return series


# --- PromQL -----------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "offset", "bool", "atan2", "inf", "nan"}
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and labels left out)."""
    text = _strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        token = match.group(0)
        if text[match.end():].lstrip().startswith("(") or token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def promql_label_problems(expr: str, series: Mapping[str, set[str]]) -> list[str]:
    """Labels matched on or grouped by that none of the expression's metrics carry."""
    text = _strip_strings(expr)
    names = promql_metric_names(expr)
    problems = []
    for name, matchers in _SELECTOR.findall(text):
        for label in _MATCHER.findall(matchers):
            if name in series and label not in series[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r} (it has {sorted(series[name])})")
    available = set().union(*(series.get(n, set()) for n in names)) | TARGET_LABELS
    for group in _GROUPING.findall(text):
        for label in (part.strip() for part in group.split(",")):
            if label and label not in available:
                problems.append(f"grouping by {label!r}, which none of {sorted(names)} carries")
    return problems


def without_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr

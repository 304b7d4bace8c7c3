"""subnet.dev.configmaps: the manifests' ConfigMaps follow the deploy files they carry."""

import shutil

import pytest
import yaml

from subnet.dev.configmaps import ROOT, SYNCED, main, stale, with_block


def config_map_data(text: str) -> dict[str, str]:
    maps = [doc for doc in yaml.safe_load_all(text) if doc["kind"] == "ConfigMap"]
    return {key: value for doc in maps for key, value in doc["data"].items()}


def other_objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc["kind"] != "ConfigMap"]


def test_the_manifests_in_the_repository_are_in_sync():
    assert stale() == {}
    assert main(["--check"]) == 0


@pytest.fixture
def copy_of_deploy(tmp_path):
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    return tmp_path


def test_a_changed_source_is_found_stale_and_rewritten_to_equal_it(copy_of_deploy):
    root = copy_of_deploy
    rules = root / "deploy/prometheus/rules.yml"
    rules.write_text(rules.read_text() + "\n# a new comment, with a blank line above\n")
    dashboard = root / "deploy/grafana/dashboards/moe-subnet.json"
    dashboard.write_text(dashboard.read_text().replace('"title": "', '"title": "Renamed ', 1))
    prometheus, grafana = "deploy/k8s/50-prometheus.yaml", "deploy/k8s/56-grafana.yaml"
    changed = stale(root)
    assert set(changed) == {prometheus, grafana}
    assert config_map_data(changed[prometheus]) == {
        "prometheus.yml": (root / "deploy/prometheus/prometheus-k8s.yml").read_text(), "rules.yml": rules.read_text()}
    assert config_map_data(changed[grafana])["moe-subnet.json"] == dashboard.read_text()
    # Everything else in the manifests stays as it was.
    for manifest in (prometheus, grafana):
        assert other_objects(changed[manifest]) == other_objects((root / manifest).read_text())


MANIFEST = """data:
  first.yml: |
    old: 1

  second.yml: |
    kept: 2
---
kind: Other
"""


def test_only_the_block_changes_byte_for_byte_and_blank_lines_around_it_stay():
    new = with_block(MANIFEST, "first.yml", "a:\n\n  b: 1\n")
    assert new == MANIFEST.replace("    old: 1\n", "    a:\n\n      b: 1\n")
    assert yaml.safe_load(new.split("---")[0])["data"] == {"first.yml": "a:\n\n  b: 1\n", "second.yml": "kept: 2\n"}
    last = with_block(MANIFEST, "second.yml", "x\n")
    assert last == MANIFEST.replace("    kept: 2\n", "    x\n")


@pytest.mark.parametrize(("content", "why"), [
    ("a:\n   \n  b: 1\n", "only spaces"),            # YAML would read the line back empty
    ("  a: 1\nb: 2\n", "indented"),                  # YAML takes the block's indent from it
    ("\n  a\n", "indented"),
    ("a: 1\r\nb: 2\r\n", "carriage returns"),
    ("a: 1", "final newline"),
    ("a: 1\n\n", "final newline"),
    ("\n", "empty"),
])
def test_content_a_block_cannot_hold_as_is_is_refused(content, why):
    with pytest.raises(ValueError, match=why):
        with_block(MANIFEST, "first.yml", content)


def test_every_synced_block_exists_once_and_a_bad_source_is_refused():
    for manifest, key, _ in SYNCED:
        assert f"  {key}: |\n" in (ROOT / manifest).read_text()
    with pytest.raises(ValueError, match="expected one line 'nope.yml: |'"):
        with_block((ROOT / SYNCED[0][0]).read_text(), "nope.yml", "x\n")
    with pytest.raises(ValueError, match="exactly one final newline"):
        with_block((ROOT / SYNCED[0][0]).read_text(), SYNCED[0][1], "no newline at the end")

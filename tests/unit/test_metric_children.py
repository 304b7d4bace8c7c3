"""subnet.metric_children: the cached child is the metric's own, so what is exposed does not change."""

from prometheus_client import CollectorRegistry, Counter, generate_latest

from subnet.metric_children import Children


def test_a_cached_child_updates_the_metric_as_labels_would():
    registry = CollectorRegistry()
    tokens = Counter("tokens", "tokens processed", ["expert", "rpc"], registry=registry)
    of = Children(tokens)
    of("1.0", "Forward").inc(3)
    of("1.0", "Forward").inc(2)
    tokens.labels(expert="1.0", rpc="Forward").inc(1)
    of("1.1", "Backward").inc(7)
    assert of("1.0", "Forward") is tokens.labels("1.0", "Forward")
    text = generate_latest(registry).decode()
    assert 'tokens_total{expert="1.0",rpc="Forward"} 6.0' in text
    assert 'tokens_total{expert="1.1",rpc="Backward"} 7.0' in text

"""`python -m subnet.chain status` (and the stack's summary) shows each neuron's published endpoint."""

from subnet.chain.__main__ import format_status
from subnet.chain.base import Metagraph, Neuron
from subnet.rounds import RoundSchedule


def test_status_lists_every_neuron_with_its_endpoint():
    graph = Metagraph(block=3, neurons=(Neuron(0, "5" + "A" * 47, stake=1.0, validator_permit=True),
                                        Neuron(1, "5" + "B" * 47, endpoint="127.0.0.1:15061")))
    lines = format_status(graph, RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)).splitlines()
    assert lines[1].split()[-1] == "endpoint"
    assert lines[2].split()[:3] == ["0", "5AAAAA…AAAAA", "validator"] and lines[2].split()[-1] == "-"
    assert lines[3].split()[:3] == ["1", "5BBBBB…BBBBB", "miner"] and lines[3].split()[-1] == "127.0.0.1:15061"

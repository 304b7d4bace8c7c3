"""BittensorChain at its boundary with the bittensor SDK.

No Bittensor chain is reachable from this machine (nor from CI), so these tests use a stand-in
for `bittensor.Subtensor`: a small recording object with the same method names and signatures
as the SDK 11 blocking client, answering with real SDK data classes (`bittensor.Metagraph`,
`MetagraphNeuron`, `NeuronCommitment`, `SubnetInfo`, `ExtrinsicResult`, `Balance`). The tests
check what the adapter asks the SDK for (method, netuid, block, call and intent shapes) and how
it maps the answers; they cannot catch a chain that behaves differently from the SDK's docs.
"""

import subprocess
import sys

import bittensor as bt
import pytest
from bittensor.intents.serving import ServeAxon
from bittensor.intents.weights import SetWeights
from bittensor.reads.subnets import SubnetInfo
from bittensor_wallet import Keypair

from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.rounds import RouterRounds
from subnet.chain.base import ChainError, Hyperparameters, Neuron
from subnet.chain.bittensor_chain import BittensorChain, commitment_info, decode_commitment, encode_commitment
from subnet.chain.config import ChainConfig, open_chain, signing_wallet
from subnet.chain.signing import commit_payload, digest_of, reveal_payload, serve_payload, weights_payload
from subnet.envconfig import ConfigError, from_env
from subnet.identity import create_dev_wallet, load_identity
from subnet.rounds import RoundSchedule

NETUID = 7
SCHEDULE = RoundSchedule.of(train=40, commit=20, reveal=20, validate=10, merge=10)  # round r: 100r..100r+99
HOT = Keypair.create_from_seed("0x" + "31" * 32)
OTHER = Keypair.create_from_seed("0x" + "32" * 32)
DATA = "manifests/miner/round-1.json"


def neuron(uid, hotkey, stake, permit, incentive, last_update, axon=None):
    zero = bt.Balance.from_rao(0)
    return bt.MetagraphNeuron(
        uid=uid, hotkey=hotkey, coldkey=f"cold-{uid}", active=True, validator_permit=permit, last_update=last_update,
        block_at_registration=1, rank=0.0, trust=0.0, consensus=0.0, incentive=incentive, dividends=0.0,
        pruning_score=0.0, emission=zero, alpha_stake=zero, tao_stake=zero, total_stake=bt.Balance.from_tao(stake),
        axon=axon, identity=None, commitment=None)


def metagraph(block, neurons):
    return bt.Metagraph(
        netuid=NETUID, mechid=0, name="moe", symbol="m", block=block, tempo=100, last_step=0,
        blocks_since_last_step=0, owner_hotkey="", owner_coldkey="", network_registered_at=0,
        num_uids=len(neurons), max_uids=256, price=None, moving_price=None, identity=None, neurons=neurons,
        commitments={}, unregistered_commitments={}, raw={})


class Namespace:
    """One SDK read namespace (`subtensor.subnets` ...): records each call, answers from `answers`."""

    def __init__(self, fake, name, answers):
        self._fake, self._name, self._answers = fake, name, answers

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self._fake.calls.append((f"{self._name}.{method}", args, kwargs))
            answer = self._answers[method]
            return answer(*args, **kwargs) if callable(answer) else answer
        return call


class RecordingSubtensor:
    """Stand-in for `bittensor.Subtensor` (blocking mode). `published` is the commitment history
    [(block, hotkey, text)] that `submit_call` appends to and `subnets.commitments` reads."""

    def __init__(self, block=0, graph=None, uids=None):
        self.block = block
        self.calls = []
        self.published = []
        self.result = bt.ExtrinsicResult(success=True, message="ok")
        self.fail_with = None
        self.subnets = Namespace(self, "subnets", {
            "metagraph": lambda netuid, block=None, commitments=True: graph,
            "info": SubnetInfo(netuid=NETUID, tempo=100, burn=bt.Balance.from_tao(1), neuron_count=2),
            "commit_reveal_enabled": True,
            "commitments": self._commitments,
        })
        self.hyperparameters = Namespace(self, "hyperparameters", {"reveal_period": 2})
        self.neurons = Namespace(self, "neurons", {"uid": lambda hotkey, netuid: (uids or {}).get(hotkey)})
        self.identity = Namespace(self, "identity", {"commitment": self._latest})
        self.weights = Namespace(self, "weights", {"weights": {3: {0: 0.25, 1: 0.75}}})

    def _visible(self, block):
        latest = {}
        for at, hotkey, text in self.published:
            if at <= block:
                latest[hotkey] = (at, text)
        return latest

    def _commitments(self, netuid, block=None):
        if self.fail_with:
            raise self.fail_with
        return {hotkey: bt.NeuronCommitment(
                    hotkey=hotkey, netuid=netuid, uid=0, block=at, queried_block=block, deposit=bt.Balance.from_rao(0),
                    data=text, encrypted=False, reveal_round=None, revealed=[], fields=[])
                for hotkey, (at, text) in self._visible(self.block if block is None else block).items()}

    def _latest(self, netuid, hotkey):
        found = self._visible(self.block).get(hotkey)
        return None if found is None else bt.Commitment(block=found[0], deposit=bt.Balance.from_rao(0),
                                                         data=found[1], fields=[])

    def block_time(self):
        return 12.0

    def submit_call(self, call, wallet, **kwargs):
        self.calls.append(("submit_call", (call, wallet), kwargs))
        data = b"".join(next(iter(f.values())) for f in call.params["info"]["fields"])
        signer = wallet.hotkey if kwargs.get("signer") == "hotkey" and hasattr(wallet, "hotkey") else wallet
        self.published.append((self.block, signer.ss58_address, data.decode()))
        return self.result

    def execute(self, intent, wallet, **kwargs):
        self.calls.append(("execute", (intent, wallet), kwargs))
        return self.result

    def close(self):
        self.calls.append(("close", (), {}))


def make(fake, wallet=HOT):
    return BittensorChain("test", NETUID, wallet=wallet, subtensor=fake, schedule=SCHEDULE)


def commit(chain, round, data=DATA, key=HOT):
    digest = digest_of(data)
    chain.commit(key.ss58_address, round, digest, key.sign(commit_payload(key.ss58_address, round, digest)))


def reveal(chain, round, data=DATA, key=HOT):
    chain.reveal(key.ss58_address, round, data, key.sign(reveal_payload(key.ss58_address, round, data)))


def submitted(fake):
    return [c for c in fake.calls if c[0] == "submit_call"]


def test_reads_map_sdk_answers_to_our_vocabulary():
    graph = metagraph(1234, [neuron(0, "hk-a", 10.5, True, 0.0, 1200), neuron(1, "hk-b", 0.0, False, 0.6, 0)])
    fake = RecordingSubtensor(block=1234, graph=graph)
    chain = make(fake)
    assert chain.block() == 1234
    got = chain.metagraph()
    assert got.block == 1234
    assert got.neurons == (Neuron(uid=0, hotkey="hk-a", coldkey="cold-0", stake=10.5, validator_permit=True,
                                  incentive=0.0, last_weights_block=1200),
                           Neuron(uid=1, hotkey="hk-b", coldkey="cold-1", stake=0.0, validator_permit=False,
                                  incentive=0.6, last_weights_block=None))
    assert ("subnets.metagraph", (NETUID,), {"commitments": False}) in fake.calls
    assert chain.hyperparameters() == Hyperparameters(tempo=100, commit_reveal_period=2, commit_reveal_enabled=True,
                                                      block_s=12.0)
    assert chain.weights() == {3: {0: 0.25, 1: 0.75}}


def test_missing_subnet_and_sdk_failures_are_chain_errors():
    with pytest.raises(ChainError, match="netuid 7 does not exist on test"):
        make(RecordingSubtensor(graph=None)).metagraph()
    fake = RecordingSubtensor(block=165)
    fake.fail_with = bt.RpcConnectionError("all endpoints down")
    with pytest.raises(ChainError, match="reading commitments at block 159 failed: RpcConnectionError: all endpoints"):
        make(fake).commitments(1)


def test_register_only_looks_up_the_uid_and_says_how_to_register():
    chain = make(RecordingSubtensor(uids={HOT.ss58_address: 5}))
    assert chain.register(HOT.ss58_address) == 5
    with pytest.raises(ChainError, match=r"not registered on netuid 7 \(test\).*btcli subnets register --netuid 7"):
        chain.register(OTHER.ss58_address)


def test_commit_publishes_a_hotkey_signed_plaintext_commitment():
    fake = RecordingSubtensor(block=105)
    commit(make(fake), 1)
    [(_, (call, wallet), kwargs)] = submitted(fake)
    assert (call.module, call.function) == ("Commitments", "set_commitment")
    assert call.params == {"netuid": NETUID, "info": commitment_info(f"moe1:c:1:{digest_of(DATA)}")}
    assert wallet is HOT and kwargs == {"signer": "hotkey"}


def test_commit_is_refused_before_sending_when_it_would_not_count():
    fake = RecordingSubtensor(block=160)
    chain = make(fake)
    with pytest.raises(ChainError, match="block 160 is outside its commit window: blocks 100..159"):
        commit(chain, 1)
    fake.block = 110
    with pytest.raises(ChainError, match="bad signature"):
        chain.commit(HOT.ss58_address, 1, digest_of(DATA), OTHER.sign(commit_payload(HOT.ss58_address, 1, "x")))
    with pytest.raises(ChainError, match="signs with hotkey .*, not "):
        commit(chain, 1, key=OTHER)
    with pytest.raises(ChainError, match="has no wallet"):
        commit(make(fake, wallet=None), 1)
    commit(chain, 1)
    with pytest.raises(ChainError, match="already committed for round 1"):
        commit(chain, 1, data="manifests/other.json")
    assert len(submitted(fake)) == 1


def test_reveal_checks_the_commitment_on_chain_first():
    fake = RecordingSubtensor(block=110)
    chain = make(fake)
    commit(chain, 1)
    fake.block = 150
    with pytest.raises(ChainError, match="outside its reveal window: blocks 160..179"):
        reveal(chain, 1)
    fake.block = 165
    with pytest.raises(ChainError, match="revealed data does not match the commitment"):
        reveal(chain, 1, data="manifests/copied.json")
    with pytest.raises(ChainError, match="no commitment for round 1 on chain"):
        reveal(make(RecordingSubtensor(block=165)), 1)
    reveal(chain, 1)
    reveal(chain, 1)                                           # already on chain: nothing sent
    texts = [call.params["info"] for _, (call, _), _ in submitted(fake)]
    assert texts == [commitment_info(f"moe1:c:1:{digest_of(DATA)}"), commitment_info(f"moe1:r:1:{DATA}")]


def test_long_reveals_are_split_into_raw_fields_of_at_most_128_bytes():
    info = commitment_info("x" * 300)
    assert [list(f) for f in info["fields"]] == [["Raw128"], ["Raw128"], ["Raw44"]]
    assert b"".join(f[k] for f in info["fields"] for k in f) == b"x" * 300
    assert decode_commitment(encode_commitment("r", 4, "a:b:c")) == ("r", 4, "a:b:c")
    assert decode_commitment("something else") is None and decode_commitment(None) is None


def test_commitments_read_commits_and_reveals_at_the_end_of_their_windows():
    fake = RecordingSubtensor()
    digest = digest_of(DATA)
    fake.published = [
        (105, HOT.ss58_address, f"moe1:c:1:{digest}"),         # commit, then a valid reveal
        (165, HOT.ss58_address, f"moe1:r:1:{DATA}"),
        (120, OTHER.ss58_address, f"moe1:c:1:{digest}"),       # commit, then a reveal too late
        (185, OTHER.ss58_address, f"moe1:r:1:{DATA}"),
        (130, "hk-c", f"moe1:c:1:{digest}"),                   # reveal that does not hash to the commit
        (170, "hk-c", "moe1:r:1:manifests/copied.json"),
        (161, "hk-d", f"moe1:c:1:{digest}"),                   # committed after the commit window
        (50, "hk-e", f"moe1:c:0:{digest}"),                    # another round
    ]
    fake.block = 195
    got = {c.hotkey: (c.commit_block, c.revealed, c.reveal_block) for c in make(fake).commitments(1)}
    assert got == {HOT.ss58_address: (105, DATA, 165), OTHER.ss58_address: (120, None, None),
                   "hk-c": (130, None, None)}
    blocks = [kw["block"] for name, _, kw in fake.calls if name == "subnets.commitments"]
    assert blocks == [159, 179]                                # last commit block, last reveal block
    fake.calls.clear()
    fake.block = 140                                           # mid-commit: the state now, no reveals yet
    assert [c.revealed for c in make(fake).commitments(1)] == [None, None, None]
    assert [kw["block"] for name, _, kw in fake.calls if name == "subnets.commitments"] == [140]
    assert make(fake).commitments(5) == []                     # a round that has not started


def test_set_weights_goes_through_the_sdk_intent_with_normalized_weights():
    fake = RecordingSubtensor()
    chain = make(fake)
    uids, weights = [0, 1, 2], [1.0, 3.0, 0.0]
    chain.set_weights(HOT.ss58_address, uids, weights, HOT.sign(weights_payload(HOT.ss58_address, uids, weights)))
    [(name, (intent, wallet), _)] = [c for c in fake.calls if c[0] == "execute"]
    assert isinstance(intent, SetWeights) and wallet is HOT
    assert (intent.netuid, intent.uids, intent.weights) == (NETUID, [0, 1], [0.25, 0.75])
    fake.result = bt.ExtrinsicResult(success=False, message="rate limited",
                                     error=bt.ChainError("Weights were set 3 blocks ago"))
    with pytest.raises(ChainError, match="set_weights failed: ChainError: Weights were set 3 blocks ago"):
        chain.set_weights(HOT.ss58_address, uids, weights, HOT.sign(weights_payload(HOT.ss58_address, uids, weights)))
    with pytest.raises(ChainError, match="bad signature"):
        chain.set_weights(HOT.ss58_address, uids, weights, HOT.sign(weights_payload(HOT.ss58_address, uids, [1.0])))


def serve(chain, endpoint, key=HOT):
    chain.serve(key.ss58_address, endpoint, key.sign(serve_payload(key.ss58_address, endpoint)))


def test_serve_publishes_the_axon_through_the_sdk_intent():
    fake = RecordingSubtensor()
    chain = make(fake)
    serve(chain, "10.0.0.1:50051")
    serve(chain, "[2001:db8::1]:8091")
    intents = [(intent, wallet) for name, (intent, wallet), _ in fake.calls if name == "execute"]
    assert all(isinstance(intent, ServeAxon) and wallet is HOT for intent, wallet in intents)
    assert [(i.netuid, i.ip, i.port) for i, _ in intents] == [(NETUID, "10.0.0.1", 50051),
                                                              (NETUID, "2001:db8::1", 8091)]
    fake.result = bt.ExtrinsicResult(success=False, message="rate limited", error=bt.ChainError("ServingRateLimit"))
    with pytest.raises(ChainError, match="serve failed: ChainError: ServingRateLimit"):
        serve(chain, "10.0.0.1:50051")


def test_serve_is_refused_before_sending_when_the_chain_could_not_store_it():
    fake = RecordingSubtensor()
    chain = make(fake)
    hint = (r"'expert-0' is a hostname, but Bittensor's serve_axon stores an IP address: "
            r"advertise the service's public IP \(EXPERT_ADVERTISE_ENDPOINT=<ip>:<port>\)")
    with pytest.raises(ChainError, match=hint):
        serve(chain, "expert-0:50051")
    for unspecified in ("0.0.0.0:50051", "[::]:50051"):
        with pytest.raises(ChainError, match="is a bind address"):
            serve(chain, unspecified)
    with pytest.raises(ChainError, match="serve: endpoint must be 'host:port'"):
        serve(chain, "10.0.0.1:0")
    with pytest.raises(ChainError, match="serve: bad signature"):
        chain.serve(HOT.ss58_address, "10.0.0.1:50051", HOT.sign(serve_payload(HOT.ss58_address, "10.0.0.2:50051")))
    with pytest.raises(ChainError, match="serve: bad signature"):
        chain.serve(HOT.ss58_address, "10.0.0.1:50051", OTHER.sign(serve_payload(HOT.ss58_address, "10.0.0.1:50051")))
    with pytest.raises(ChainError, match="serve: this chain signs with hotkey .*, not "):
        serve(chain, "10.0.0.1:50051", key=OTHER)
    assert [c for c in fake.calls if c[0] == "execute"] == []


def test_metagraph_maps_the_axon_to_the_endpoint():
    axons = [None, "10.0.0.1:50051", "[2001:db8::1]:8091", "0.0.0.0:0", "garbage", "", 12345]
    graph = metagraph(10, [neuron(uid, f"hk-{uid}", 0.0, False, 0.0, 0, axon=axon) for uid, axon in enumerate(axons)])
    got = [n.endpoint for n in make(RecordingSubtensor(graph=graph)).metagraph().neurons]
    assert got == ["", "10.0.0.1:50051", "[2001:db8::1]:8091", "", "", "", ""]


def test_close_closes_only_a_subtensor_it_opened():
    fake = RecordingSubtensor()
    make(fake).close()
    assert ("close", (), {}) not in fake.calls


def test_the_chain_package_does_not_import_the_sdk():
    code = ("import sys, subnet.chain, subnet.chain.config, subnet.chain.bittensor_chain, subnet.chain.local;"
            "assert 'bittensor' not in sys.modules, 'bittensor imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_open_chain_builds_a_cold_bittensor_chain_from_env_config():
    with pytest.raises(ConfigError, match="CHAIN_NETUID is required when CHAIN=bittensor"):
        from_env(ChainConfig, {"CHAIN": "bittensor"})
    config = from_env(ChainConfig, {"CHAIN": "bittensor", "CHAIN_NETWORK": "test", "CHAIN_NETUID": "7"})
    chain = open_chain(config, SCHEDULE, wallet=HOT)
    assert isinstance(chain, BittensorChain) and (chain.network, chain.netuid, chain.wallet) == ("test", 7, HOT)
    assert isinstance(chain.subtensor, bt.Subtensor) and "mode=cold" in repr(chain.subtensor)  # nothing dialed
    chain.close()


def test_signing_wallet_is_the_services_own_hotkey_and_only_for_bittensor(tmp_path):
    wallet = create_dev_wallet(tmp_path, "svc")
    assert signing_wallet(from_env(ChainConfig, {}), wallet) is None   # the local chain: records signed by Identity
    sdk_wallet = signing_wallet(from_env(ChainConfig, {"CHAIN": "bittensor", "CHAIN_NETUID": "7"}), wallet)
    assert sdk_wallet.hotkey.ss58_address == load_identity(wallet).hotkey


@pytest.mark.parametrize("service", ["expert", "router"])
def test_services_that_commit_open_bittensor_with_a_wallet_that_signs_their_commits(tmp_path, service):
    """Expert services and the router commit checkpoints every round: on Bittensor each commit is an
    extrinsic their hotkey signs, so their chain needs the wallet (before, they opened it read-only)."""
    wallet = create_dev_wallet(tmp_path, service)
    identity = load_identity(wallet)
    env = {"CHAIN": "bittensor", "CHAIN_NETWORK": "test", "CHAIN_NETUID": str(NETUID), "WALLET_PATH": str(tmp_path),
           "WALLET_NAME": service, "S3_ENDPOINT": "127.0.0.1:9"}
    if service == "expert":
        chain = ExpertServer(from_env(ExpertConfig, {**env, "EXPERT_UIDS": "0.0"}), identity=identity)._chain()
    else:
        chain = RouterRounds(from_env(RouterConfig, env), identity, RouterMetrics()).chain
    fake = RecordingSubtensor(block=chain.schedule.phase_start(1, "commit"))
    chain.subtensor = fake   # no chain is reachable here: the SDK stand-in records what would be sent
    digest = digest_of(DATA)
    chain.commit(identity.hotkey, 1, digest, identity.sign(commit_payload(identity.hotkey, 1, digest)))
    assert fake.published == [(fake.block, identity.hotkey, f"moe1:c:1:{digest}")]

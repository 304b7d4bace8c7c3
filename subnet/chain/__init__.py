"""The chain: one interface (`Chain`), a Redis implementation for the stack and tests
(`subnet.chain.local`), one over the Bittensor SDK (`subnet.chain.bittensor_chain`, which
imports the slow SDK only when built), and `open_chain` (`subnet.chain.config`).

Importing this package never imports the bittensor SDK.
"""

from subnet.chain.base import Chain, ChainError, Commitment, Hyperparameters, Metagraph, Neuron
from subnet.chain.signing import commit_payload, digest_of, reveal_payload, weights_payload

__all__ = ["Chain", "ChainError", "Commitment", "Hyperparameters", "Metagraph", "Neuron",
           "commit_payload", "digest_of", "reveal_payload", "weights_payload"]

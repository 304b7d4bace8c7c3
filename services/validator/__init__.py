"""The validator: scores each miner's committed experts every round and merges the best into the
next global model version (ARCHITECTURE sections 4-7). `python -m services.validator`."""

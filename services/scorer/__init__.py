"""The scorer: turns validators' results into per-miner scores, an EMA, and weights on the chain.

    python -m services.scorer                  # configured by REDIS_URL, SCORER_*, WALLET_*, CHAIN_*, ROUND_*
    python -m services.scorer --env-table
    python -m services.scorer.plot runs/scorer # scores.png from ema_history.jsonl

Modules: `scoring` (pure functions: composite score, EMA, weights), `stream` (the results stream's
`scorers` consumer group), `store` (the Redis keys it writes; the router reads `moe:scores:ema`
and `moe:scores:banned`, the validator's merge `moe:scores:round:<r>`), `scorer` (wires them to the
chain), `scoreboard`, `metrics`, `config`, `plot`.
"""

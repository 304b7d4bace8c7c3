"""`make bench`: throughput and latency measured side by side in one run.

Results go to bench/results/latest.json (and latest.md, a table of the same numbers).
"""

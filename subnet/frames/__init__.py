"""A raw TCP transport for the expert's tensor calls (moe-frames/1): see protocol.py."""

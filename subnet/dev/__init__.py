"""Development helpers, never imported by a running service: proto generation and the
embedded Redis and S3 servers that tests and the local stack start."""

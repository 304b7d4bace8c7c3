"""What several services share: tensor codec, registry, config from the environment, telemetry."""

"""The wire contract's generated code: `make protos` writes v1/ from protos/subnet/wire/v1/.
The protobuf package on the wire stays `moe.v1`; only the Python module path lives here."""

"""Root test configuration.

gRPC's fork handlers can deadlock a process that forks (subprocess with preexec_fn, used
to give every child server PR_SET_PDEATHSIG) while gRPC threads are running; our children
exec immediately, so the handlers are not needed. This must be set before grpc is imported.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

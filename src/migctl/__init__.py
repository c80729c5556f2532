"""migctl, the client.

gRPC's C core writes its own log lines (a failed TLS handshake, at INFO) to stderr; migctl's
stderr is for ``error: ...`` lines a user reads, and the error already says what the
handshake said. The level is read once when grpc is first imported, which is why it is set
here, before vmmigrate.migctl.main imports grpc (a user's own GRPC_VERBOSITY wins).
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

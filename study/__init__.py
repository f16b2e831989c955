"""study: does ImageNet pre-training transfer non-robustness? (Zhang et al.)"""

import os

# Under `uv run`, Ray by default rebuilds the driver's uv environment for every job in a
# copy of the working directory, for every job. The workers of a Ray that
# study starts on this machine can use this very environment; a cluster's nodes get
# theirs from their set-up commands (cluster.yaml).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

"""Running stages on Ray (`--executor ray`): the only package that imports `ray`.

- `session`: connecting (a private instance on this machine, or a cluster), the check that every
  node sees the work folder, running tasks, and shutting down what this process started.
- `session.map_tasks` also runs the exact Step-1 engine's block tasks (`step1.engines.blocked`).
- `extract`: the encoder over the images through Ray Data, into the same image cache and artifact.

Importing this package does not import ray; `session.connect` does.
"""

from medsclean.distributed.session import RaySession, connect, shutdown

__all__ = ["RaySession", "connect", "shutdown"]

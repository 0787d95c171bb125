"""The coordinator's one refusal type: the scheduler, Join (swarm_join.py) and the server's handlers raise it,
and the server answers it with its gRPC status. A module of its own, so that raising it imports nothing else."""

from __future__ import annotations


class RequestError(Exception):
    """A request the coordinator refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

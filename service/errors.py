"""Service errors that carry their gRPC status, mapped to codes in one place (servicers.py)."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error the client should see with a specific status code and this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelLoadError(ServiceError):
    """A model source that cannot be resolved, downloaded or opened by onnxruntime."""

    code = grpc.StatusCode.FAILED_PRECONDITION

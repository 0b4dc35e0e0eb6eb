"""What every radixserve gRPC server shares: message limits, ``grpc.health.v1`` and server reflection."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options refusing any message over ``max_message_bytes`` (RESOURCE_EXHAUSTED, the server keeps serving)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]


class HealthReporter:
    """Serves ``grpc.health.v1`` for the overall server ("") and each named service, and flips them together."""

    def __init__(self, server: grpc.aio.Server, service_names: Sequence[str]) -> None:
        self._servicer = health.aio.HealthServicer()
        self._names = ("", *service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        names = (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._names:
            await self._servicer.set(name, status)

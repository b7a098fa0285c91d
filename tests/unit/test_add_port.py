import socket

import pytest

from ipaas.lifecycle import CannotListen
from ipaas.service.server import add_port


class _Server:
    """Records whether gRPC was asked to bind: it writes its own line to stderr on failure."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def add_insecure_port(self, address: str) -> int:
        self.asked.append(address)
        return int(address.rpartition(":")[2]) or 1


def test_a_taken_or_foreign_address_is_refused_before_grpc_tries_it() -> None:
    """gRPC's C core prints its own line before it raises; the operator was promised one.
    Pointing fd 2 at a file while gRPC bound (the way that line was held back) also took
    what every other thread wrote meanwhile (the review lost 3 of 186 lines)."""
    server = _Server()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        with pytest.raises(CannotListen, match="address already in use"):
            add_port(server, address)  # type: ignore[arg-type]
    with pytest.raises(CannotListen, match="IPAAS_GRPC_LISTEN"):
        add_port(server, "192.0.2.1:50051")  # type: ignore[arg-type]  # TEST-NET-1: not this host's
    assert server.asked == []


def test_a_free_address_or_a_port_grpc_picks_goes_to_grpc() -> None:
    server = _Server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert add_port(server, f"127.0.0.1:{port}") == port  # type: ignore[arg-type]
    assert add_port(server, "127.0.0.1:0") == 1  # type: ignore[arg-type]
    assert server.asked == [f"127.0.0.1:{port}", "127.0.0.1:0"]

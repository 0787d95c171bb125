"""How the worker reaches the coordinator: TLS, and never the token in plaintext off this machine unless asked."""

from __future__ import annotations

from pathlib import Path

from coordinator.api.client import CoordinatorClient


def check_address(coordinator: str) -> None:
    """HOST:PORT (or [IPv6]:PORT, or a gRPC URI such as unix:PATH); a missing port would be retried forever."""
    if coordinator.startswith("unix:"):
        return
    host, sep, port = coordinator.rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]")) and "://" not in host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or bare_ipv6:
        raise ValueError(f"--coordinator {coordinator!r}: write HOST:PORT with the port the organizer gave, e.g. "
                         "coordinator.example.org:50051 (or [::1]:50051)")


def check_transport(coordinator: str, tls: bool, ca_cert: Path | None, insecure: bool) -> None:
    """Refuse to send the token in plaintext to anything but this machine: a non-loopback coordinator needs
    --tls (and --ca-cert for a private CA), or an explicit --insecure."""
    if ca_cert is not None and not Path(ca_cert).is_file():
        raise ValueError(f"--ca-cert {ca_cert}: no such file")
    host = coordinator.rpartition(":")[0].strip("[]") if ":" in coordinator else coordinator
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    if not (tls or ca_cert is not None or insecure or loopback):
        raise ValueError(f"refusing to send your token in plaintext to {coordinator}: use --tls (and --ca-cert FILE "
                         "if the organizer's certificate is self-signed), or --insecure if you accept that anyone on "
                         "the path can read it")


def coordinator_client(coordinator: str, token: str, tls: bool = False, ca_cert: Path | None = None, **kw):
    """The worker's gRPC client: TLS when asked (or when a CA certificate is given), plaintext otherwise."""
    roots = Path(ca_cert).read_bytes() if ca_cert is not None else None
    return CoordinatorClient(coordinator, token, tls=tls, root_certificates=roots, **kw)

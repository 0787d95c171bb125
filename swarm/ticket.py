"""Round tickets: the coordinator's word on who averages each module with whom, and with what weight.

The coordinator knows every slot's modules and, once the slots' workers joined the round (the `Join` RPC
with their hivemind peer id), who holds them; it freezes the membership and gives each slot a ticket it
signs with its Ed25519 key:

    key = TicketKey.load_or_create(state_dir / "keys" / "ticket_ed25519")      # the coordinator, once
    signed = key.sign(RoundTicket(run="demo", round=3, slot="w1", peer_id="12D3...",
                                  groups={"trunk": {"12D3...": 4096.0, "12D3...b": 4096.0}}, expires=...))
    ticket = verify_ticket(key.public_hex, signed.body, signed.signature)      # the worker, with its pinned key

`groups[m]` maps the hivemind peer id of every member of module m's group to its weight: the tokens the
coordinator leased to that member's slot, never a figure a peer reports. A peer not in its own ticket's
group of m (it joined after the freeze) keeps its Δ of m local. A member accepts a Δ only from the other
peers of its ticket's group (swarm/exchange.py), whose identity libp2p authenticates (the peer id is the
hash of the key that signs the connection), and weighs it with the ticket's weight.

The public key reaches a worker at Register and is pinned in its cache: a coordinator that changes keys,
or anyone on a plaintext path between them, cannot hand the worker a ticket it accepts. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modules import parse_module

PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58, as libp2p prints peer ids
MAX_WEIGHT = 1e15  # tokens; a weight outside (0, MAX_WEIGHT] is refused


class TicketError(ValueError):
    """A ticket that does not parse, is not signed by the pinned key, or is not for this round and peer."""


@dataclass(frozen=True)
class RoundTicket:
    run: str
    round: int
    slot: str
    peer_id: str                              # the peer this ticket is for
    groups: dict[str, dict[str, float]]       # module -> {member peer id: weight}; every module of the slot
    expires: float                            # Unix seconds; a worker refuses an expired ticket

    def __post_init__(self) -> None:
        check_ticket_fields(self)

    def members(self, module: str) -> dict[str, float]:
        """The group of `module` (peer id -> weight); empty when this peer is not a member of it."""
        group = self.groups.get(module, {})
        return group if self.peer_id in group else {}

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "slot": self.slot, "peer_id": self.peer_id,
                "groups": {m: dict(g) for m, g in self.groups.items()}, "expires": self.expires}

    def encode(self) -> bytes:
        """The canonical bytes that are signed (sorted keys, no spaces)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> RoundTicket:
        try:
            d = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise TicketError(f"the ticket is not JSON: {e}") from None
        if not isinstance(d, dict) or set(d) != {"run", "round", "slot", "peer_id", "groups", "expires"}:
            raise TicketError("the ticket must be an object with exactly run, round, slot, peer_id, groups, expires")
        try:
            return cls(run=d["run"], round=d["round"], slot=d["slot"], peer_id=d["peer_id"], groups=d["groups"],
                       expires=d["expires"])
        except (TypeError, ValueError) as e:
            raise TicketError(str(e)) from None


def check_ticket_fields(t: RoundTicket) -> None:
    if not isinstance(t.run, str) or not t.run or not isinstance(t.slot, str) or not t.slot:
        raise TicketError("ticket run and slot must be non-empty strings")
    if isinstance(t.round, bool) or not isinstance(t.round, int) or t.round < 0:
        raise TicketError(f"ticket round must be an integer >= 0, got {t.round!r}")
    if not isinstance(t.peer_id, str) or not PEER_ID.fullmatch(t.peer_id):
        raise TicketError(f"ticket peer_id {t.peer_id!r} is not a base58 peer id")
    if isinstance(t.expires, bool) or not isinstance(t.expires, int | float) or not math.isfinite(t.expires):
        raise TicketError("ticket expires must be a finite number")
    if not isinstance(t.groups, dict):
        raise TicketError("ticket groups must be a mapping module -> {peer id: weight}")
    for m, group in t.groups.items():
        try:
            parse_module(m)
        except (TypeError, ValueError) as e:
            raise TicketError(f"ticket group {m!r}: {e}") from None
        if not isinstance(group, dict):
            raise TicketError(f"ticket group {m} must map peer ids to weights")
        for p, w in group.items():
            if not isinstance(p, str) or not PEER_ID.fullmatch(p):
                raise TicketError(f"ticket group {m}: {p!r} is not a base58 peer id")
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= MAX_WEIGHT:
                raise TicketError(f"ticket group {m}: the weight of {p} must be in (0, {MAX_WEIGHT:g}], got {w!r}")


@dataclass(frozen=True)
class SignedTicket:
    body: bytes        # RoundTicket.encode()
    signature: bytes   # Ed25519 over body


class TicketKey:
    """The coordinator's Ed25519 signing key (a raw 32-byte private key file, mode 0600)."""

    def __init__(self, private_key):
        self._key = private_key

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> TicketKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        path = Path(path)
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise TicketError(f"{path} is not a 32-byte Ed25519 private key ({len(raw)} bytes); move it away "
                                  "to make a new key (workers pinned the old one: they must re-pin)")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cls(key)

    @classmethod
    def generate(cls) -> TicketKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def public_hex(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, ticket: RoundTicket) -> SignedTicket:
        body = ticket.encode()
        return SignedTicket(body, self._key.sign(body))


def verify_ticket(public_hex: str, body: bytes, signature: bytes) -> RoundTicket:
    """The ticket in `body` if `signature` is the pinned key's over it; TicketError otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
    except ValueError as e:
        raise TicketError(f"the pinned ticket key {public_hex!r} is not an Ed25519 public key: {e}") from None
    try:
        key.verify(signature, body)
    except InvalidSignature:
        raise TicketError("the ticket's signature is not the coordinator's (pinned key): refused") from None
    return RoundTicket.decode(body)


def expect_ticket(t: RoundTicket, *, run: str, round_: int, slot: str, peer_id: str, now: float) -> RoundTicket:
    """`t` if it is for this run, round, slot and peer and has not expired; TicketError naming the field if not."""
    for what, got, want in (("run", t.run, run), ("round", t.round, round_), ("slot", t.slot, slot),
                            ("peer_id", t.peer_id, peer_id)):
        if got != want:
            raise TicketError(f"the ticket is for {what} {got!r}, this task's is {want!r}: refused")
    if t.expires < now:
        raise TicketError(f"the ticket expired {now - t.expires:.0f} s ago: refused")
    return t


def round_tickets(run: str, round_: int, members: dict[str, tuple[str, list[str], float]],
                  expires: float) -> dict[str, RoundTicket]:
    """Every slot's ticket of a round: `members` maps slot -> (its peer id, the modules it holds, its weight);
    the group of a module is every member holding it. What the coordinator signs once it froze the round;
    benchmarks and tests that run workers without a coordinator use it as is."""
    holders: dict[str, dict[str, float]] = {}
    for peer, modules, weight in members.values():
        for m in modules:
            holders.setdefault(m, {})[peer] = weight
    return {slot: RoundTicket(run, round_, slot, peer, {m: dict(holders[m]) for m in modules}, expires)
            for slot, (peer, modules, weight) in members.items()}

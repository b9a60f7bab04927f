"""Who is asking: the client address the login rate limit counts failures against.

`X-Forwarded-For` is believed only when the connection comes from a proxy the operator
named (`mmagg serve --trusted-proxies 10.0.0.2,10.1.0.0/16`): then the address is the
right-most entry of the header that is not itself a trusted proxy. From anyone else the
header is ignored, so no client can pick the address its failures are counted under (to
escape the limit, or to lock out somebody else).

uvicorn rewrites the connection's address from `X-Forwarded-For` by itself when run with
its defaults (`proxy_headers=True`, trusting 127.0.0.1); `mmagg serve` turns that off and
leaves the decision here. An app served by a uvicorn that still rewrites cannot know the
real peer of a request carrying the header: such requests all share one address,
`FORWARDED_UNVERIFIED`, so a forged header buys nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

FORWARDED_UNVERIFIED = "forwarded-unverified"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _host(value: str) -> str:
    """The address of an `X-Forwarded-For` entry, without port or brackets."""
    text = value.strip()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


class TrustedProxies:
    """Addresses and networks whose `X-Forwarded-For` is believed.

    Example:
        >>> proxies = TrustedProxies(["10.0.0.2", "192.168.0.0/16"])
        >>> proxies.client("10.0.0.2", ["203.0.113.9, 192.168.1.1"])
        '203.0.113.9'
        >>> proxies.client("198.51.100.7", ["203.0.113.9"])
        '198.51.100.7'
    """

    def __init__(self, proxies: Iterable[str] = ()) -> None:
        networks: list[_Network] = []
        for entry in proxies:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted proxy: expected an IP address or network (CIDR), got {text!r}"
                ) from None
        self.networks: tuple[_Network, ...] = tuple(networks)

    @classmethod
    def parse(cls, text: str | None) -> TrustedProxies:
        """From a comma-separated list, as `--trusted-proxies` takes it."""
        return cls((text or "").split(","))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        """Whether `host` is one of the named proxies."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The address to count a request under, given its TCP peer and header values."""
        entries = [_host(part) for value in forwarded_for for part in value.split(",")]
        entries = [entry for entry in entries if entry]
        if not entries:
            return peer
        if self.trusts(peer):
            for entry in reversed(entries):
                if not self.trusts(entry):
                    return entry
            return entries[0]
        if peer in entries:
            # The server in front of us (uvicorn's proxy_headers) may already have put a
            # header value here: the real peer is unknown.
            return FORWARDED_UNVERIFIED
        return peer

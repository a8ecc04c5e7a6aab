"""Which Host headers the server answers: loopback names and the listen address (and --allowed-host names), so
a web page elsewhere cannot reach a server on this machine by DNS rebinding; `HostCheck` is the middleware; and the
OpenAI-shaped error body every refusal answers with."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..config import ConfigError

LOOPBACK = ("localhost", "127.0.0.1", "::1")


WILDCARD = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class AllowedHosts:
    """The names a request's Host header may give: loopback, the listening address, --allowed-host names;
    when listening on every address (0.0.0.0, ::) also any IP address and this machine's name. A
    DNS-rebinding page always sends its own domain name, so it is refused."""

    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def serving(cls, host: str, extra: Iterable[str] = ()) -> AllowedHosts:
        names = set(LOOPBACK)
        for given in extra:
            if (name := host_name(given)) is None:
                raise ConfigError(f"--allowed-host {given!r} is not a host name; give one like example.org")
            names.add(name)
        wildcard = host in WILDCARD
        names.add(socket.gethostname().lower() if wildcard else _normal(host))
        return cls(frozenset(names), any_ip=wildcard)

    def accepts(self, header: str | None) -> bool:
        name = host_name(header)
        if name is None:
            return False
        return name in self.names or (self.any_ip and _is_ip(name))


def _normal(name: str) -> str:
    return name.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(header: str | None) -> str | None:
    """The name in a Host header without its port ("[::1]:8000" -> "::1"), lower case; None if malformed."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(:\d{1,5})?", (header or "").strip())
    return _normal(match.group(1)) if match else None


class HostCheck:
    """ASGI middleware: requests whose Host header is not one of `hosts` get 403 (DNS rebinding)."""

    def __init__(self, app, hosts: AllowedHosts):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):

        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if not self.hosts.accepts(host):
                name = host_name(host) or "NAME"
                message = (f"Host {host or 'none'!r} is not a name this server answers to; open it by localhost "
                           f"or its address, or start it with --allowed-host {name}")
                await JSONResponse(error_body(message, "Host"), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

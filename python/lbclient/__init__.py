"""An async client of the lb daemon's HTTP/JSON API, for services in a mesh.

It speaks to the daemon over its root-only Unix socket or over TCP with a bearer token::

    lb = LoadBalancer(socket="/run/lb/default.sock")          # or url=..., token=...
    await lb.register_instance(service_name="auth-service",
                               instance=ServiceInstance(id="auth-1", address="10.0.0.1", port=8080))
    instance = await lb.get_instance("auth-service")
    await lb.update_instance_health(service_name="auth-service", instance_id="auth-1", health_score=0.8)

A refused call raises a LoadBalancerError subclass that carries the API's error and detail.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import httpx

__all__ = [
    "LoadBalancer",
    "ServiceInstance",
    "PickedInstance",
    "LoadBalancerError",
    "InvalidRequest",
    "NotFound",
    "Conflict",
    "Unauthorized",
    "Forbidden",
    "ServerError",
]


class LoadBalancerError(Exception):
    """The API refused a call: its HTTP status, error kind and one-line detail."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class InvalidRequest(LoadBalancerError):
    """400: the request is malformed or a value is out of range."""


class NotFound(LoadBalancerError):
    """404: no such service or instance."""


class Conflict(LoadBalancerError):
    """409: it exists already."""


class Unauthorized(LoadBalancerError):
    """401: no token, or an unknown one."""


class Forbidden(LoadBalancerError):
    """403: a read token on a change."""


class ServerError(LoadBalancerError):
    """5xx: the daemon failed."""


_BY_STATUS = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}


def _check_name(text: Any, what: str) -> None:
    """Raises ValueError for what no service name or instance id can be (the daemon refuses
    them too): not a string, empty, `.` or `..`, or holding a control character."""
    if not isinstance(text, str) or text in ("", ".", ".."):
        raise ValueError(f"invalid {what} {text!r}: empty, '.' and '..' are not names")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise ValueError(f"invalid {what} {text!r}: it contains a control character")


@dataclass
class ServiceInstance:
    """A backend of a service, as registered."""

    id: str
    address: str
    port: Optional[int] = None
    weight: int = 100
    region: Optional[str] = None
    zone: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        if not body.get("labels"):
            body.pop("labels", None)
        return body


@dataclass
class PickedInstance(ServiceInstance):
    """The instance a flow gets, and where the answer came from: `maglev` (a fresh flow),
    `connection-table` or `nat-table` (a flow already pinned)."""

    source: str = "maglev"


class LoadBalancer:
    """The daemon's API. Use `async with LoadBalancer(...) as lb:` or call `aclose()`."""

    def __init__(
        self,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 10.0,
        verify: Any = True,
    ):
        """`verify`: for https URLs, True (the system's CAs), a CA bundle's path, or False."""
        if (socket is None) == (url is None):
            raise ValueError("give exactly one of socket= or url=")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if socket is not None:
            transport = httpx.AsyncHTTPTransport(uds=socket)
            self._http = httpx.AsyncClient(
                transport=transport, base_url="http://lb", headers=headers, timeout=timeout
            )
        else:
            self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, verify=verify)

    async def __aenter__(self) -> "LoadBalancer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None, params: Any = None) -> Any:
        response = await self._http.request(method, path, json=body, params=params)
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.is_success:
            return payload.get("data")
        cls = _BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else LoadBalancerError)
        raise cls(
            response.status_code,
            payload.get("error", "unknown"),
            payload.get("detail", response.text.strip()),
        )

    @staticmethod
    def _seg(text: str, what: str = "name") -> str:
        """`text` as one URL path segment, percent-encoded. `.` and `..` survive encoding and
        URLs resolve them away (`/v1/services/web/instances/..` is `/v1/services/web`), so they
        are refused before anything is sent, as are empty names and control characters."""
        _check_name(text, what)
        return quote(text, safe="")

    def _service(self, service_name: str) -> str:
        return f"/v1/services/{self._seg(service_name, 'service name')}"

    def _instance(self, service_name: str, instance_id: str) -> str:
        return f"{self._service(service_name)}/instances/{self._seg(instance_id, 'instance id')}"

    async def register_instance(self, service_name: str, instance: ServiceInstance) -> None:
        """Adds a backend to a service."""
        _check_name(instance.id, "instance id")
        await self._call("POST", f"{self._service(service_name)}/instances", instance.to_api())

    async def deregister_instance(self, service_name: str, instance_id: str) -> None:
        await self._call("DELETE", self._instance(service_name, instance_id))

    async def get_instance(self, service_name: str, src: Optional[str] = None) -> PickedInstance:
        """The instance a flow from `src` ("IP:PORT") gets; without it, a fresh flow's pick."""
        params = {"src": src} if src else None
        data = await self._call("GET", f"{self._service(service_name)}/pick", params=params)
        return PickedInstance(
            id=data["backend"], address=data["address"], port=data.get("port"), source=data["source"]
        )

    async def update_instance_health(
        self, service_name: str, instance_id: str, health_score: float, ttl: Optional[float] = None
    ) -> None:
        """Sets the instance's external health score, 0..1 (0 excludes it), optionally expiring."""
        body: dict[str, Any] = {"score": health_score}
        if ttl is not None:
            body["ttl"] = ttl
        await self._call(
            "PUT",
            f"{self._instance(service_name, instance_id)}/health",
            body,
        )

    async def report_load(
        self,
        service_name: str,
        instance_id: str,
        cpu: Optional[float] = None,
        memory: Optional[float] = None,
        connections: Optional[int] = None,
        ttl: Optional[float] = None,
    ) -> None:
        """Reports the instance's own load (CPU and memory in use 0..1, open connections);
        resource-aware services weigh by it. It holds `ttl` seconds (default 30)."""
        body: dict[str, Any] = {
            k: v for k, v in (("cpu", cpu), ("memory", memory), ("connections", connections), ("ttl", ttl)) if v is not None
        }
        await self._call(
            "PUT",
            f"{self._instance(service_name, instance_id)}/load",
            body,
        )

    async def set_weight(self, service_name: str, instance_id: str, weight: int) -> None:
        await self._call(
            "PUT",
            f"{self._instance(service_name, instance_id)}/weight",
            {"weight": weight},
        )

    async def services(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/services")

    async def health(self, service_name: Optional[str] = None) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/health", params={"service": service_name} if service_name else None)

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/stats")

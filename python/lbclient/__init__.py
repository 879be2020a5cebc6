"""An async client of the lb daemon's HTTP/JSON API, for services in a mesh.

It speaks to the daemon over its root-only Unix socket or over TCP with a bearer token::

    lb = LoadBalancer(socket="/run/lb/default.sock")          # or url=..., token=...
    await lb.register_instance(service_name="auth-service",
                               instance=ServiceInstance(id="auth-1", address="10.0.0.1", port=8080))
    instance = await lb.get_instance("auth-service")
    await lb.update_instance_health(service_name="auth-service", instance_id="auth-1", health_score=0.8)

An instance can stay registered for as long as a block runs, heartbeating meanwhile, and a
service's instances can be watched as they change::

    async with lb.registration(service_name="auth-service", instance=inst, ttl=10):
        ...
    async for change in lb.watch_instances("auth-service"):
        ...

A refused call raises a LoadBalancerError subclass that carries the API's error and detail.
`SyncLoadBalancer` makes the same calls for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import unicodedata
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import httpx

__version__ = "0.2.0"

__all__ = [
    "LoadBalancer",
    "SyncLoadBalancer",
    "ServiceInstance",
    "PickedInstance",
    "Instance",
    "InstancesChange",
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
    `connection-table`, `embryonic-table` (a flow that has sent one packet) or `nat-table`
    (a flow already pinned)."""

    source: str = "maglev"


@dataclass(frozen=True)
class Instance:
    """One instance as a watch sees it: where it is, its state (`up`, `down`, or `drained`
    by a late heartbeat) and whether it takes new flows."""

    id: str
    address: str
    port: int
    weight: int
    state: str
    serving: bool

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "Instance":
        return cls(
            id=d["id"],
            address=d["address"],
            port=d["port"],
            weight=d["weight"],
            state=d["state"],
            serving=d["serving"],
        )


@dataclass(frozen=True)
class InstancesChange:
    """A service's instances after a change, and what changed since the last one a watch
    yielded (the first yields every instance as added)."""

    index: int
    instances: list[Instance]
    added: list[Instance]
    removed: list[Instance]
    changed: list[Instance]


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

    async def _call(
        self, method: str, path: str, body: Any = None, params: Any = None, timeout: Optional[float] = None
    ) -> Any:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = await self._http.request(method, path, json=body, params=params, **extra)
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

    async def register_instance(
        self,
        service_name: str,
        instance: ServiceInstance,
        ttl: Optional[float] = None,
        deregister_after: Optional[float] = None,
    ) -> None:
        """Adds a backend to a service. With `ttl` (seconds) it must `heartbeat` within it or
        it is drained (no new flows), then removed `deregister_after` seconds later."""
        _check_name(instance.id, "instance id")
        body = instance.to_api()
        if ttl is not None:
            body["ttl"] = ttl
        if deregister_after is not None:
            body["deregister_after"] = deregister_after
        await self._call("POST", f"{self._service(service_name)}/instances", body)

    async def heartbeat(self, service_name: str, instance_id: str) -> None:
        """Renews a registration made with a `ttl`."""
        await self._call("PUT", f"{self._instance(service_name, instance_id)}/heartbeat")

    @contextlib.asynccontextmanager
    async def registration(
        self,
        service_name: str,
        instance: ServiceInstance,
        ttl: float,
        deregister_after: Optional[float] = None,
        interval: Optional[float] = None,
    ) -> AsyncIterator[None]:
        """Keeps `instance` registered while the block runs: registers it with `ttl`,
        heartbeats every `interval` seconds (default ttl/3) in the background, and deregisters
        it when the block ends, also when it is cancelled or raises. A heartbeat the daemon
        refuses (the instance was removed, say) is raised in the block's task: the block is
        interrupted with that LoadBalancerError, never left running unregistered."""
        every = ttl / 3 if interval is None else interval
        await self.register_instance(service_name, instance, ttl=ttl, deregister_after=deregister_after)
        block = asyncio.current_task()
        failed: list[BaseException] = []

        def refused(e: Exception) -> None:
            # Raised in the block, below.
            failed.append(e)
            if block is not None:
                block.cancel()

        heart = asyncio.create_task(_heartbeats(self, service_name, instance.id, every, refused))

        async def leave() -> None:
            heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heart
            with contextlib.suppress(NotFound):
                await self.deregister_instance(service_name, instance.id)

        async def finish() -> int:
            """Deregisters to the end whatever cancels arrive meanwhile; returns how many did
            (a cancel of ours still pending is one of them)."""
            done = asyncio.ensure_future(leave())
            absorbed = 0
            while True:
                try:
                    await asyncio.shield(done)
                    return absorbed
                except asyncio.CancelledError:
                    if done.done() and done.cancelled():
                        raise
                    absorbed += 1

        ours = 1 if block is not None else 0
        try:
            yield
        except asyncio.CancelledError:
            await finish()
            # Only our cancel: the block ends with the heartbeat's error instead.
            if failed and block is not None and block.uncancel() == 0:
                raise failed[0] from None
            raise
        except BaseException:
            await finish()
            if failed and block is not None and block.cancelling():
                block.uncancel()
            raise
        else:
            absorbed = await finish()
            if failed:
                if block is not None and block.cancelling():
                    block.uncancel()
                if absorbed > ours:
                    raise asyncio.CancelledError()
                raise failed[0]
            if absorbed:
                raise asyncio.CancelledError()

    async def instances(
        self, service_name: str, index: Optional[int] = None, wait: Optional[float] = None
    ) -> tuple[int, list[Instance]]:
        """A service's instances and their index. With `index`, waits (at most `wait` seconds,
        on the daemon) until they differ from that index's, then answers."""
        params: dict[str, Any] = {}
        if index is not None:
            params["index"] = index
        if wait is not None:
            params["wait"] = wait
        # The daemon holds a watch up to `wait`: the client waits that long and more.
        timeout = None if index is None else (wait if wait is not None else 20.0) + 10.0
        data = await self._call("GET", f"{self._service(service_name)}/instances", params=params, timeout=timeout)
        return data["index"], [Instance.from_api(d) for d in data["instances"]]

    async def watch_instances(self, service_name: str, wait: float = 20.0) -> AsyncIterator[InstancesChange]:
        """Yields the service's instances now, then after each change, by long polls on the
        daemon (each waits there until a change, or `wait` seconds). Ends by raising, e.g.
        NotFound when the service is removed."""
        index: Optional[int] = None
        known: dict[str, Instance] = {}
        while True:
            new_index, now = await self.instances(service_name, index=index if index is not None else 0, wait=wait)
            if index is not None and new_index == index:
                continue  # the wait ran out with nothing new
            current = {i.id: i for i in now}
            yield InstancesChange(
                index=new_index,
                instances=now,
                added=[i for k, i in current.items() if k not in known],
                removed=[i for k, i in known.items() if k not in current],
                changed=[i for k, i in current.items() if k in known and known[k] != i],
            )
            index, known = new_index, current

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

    async def drain_instance(self, service_name: str, instance_id: str) -> None:
        """Drains the instance: no new flows, its established flows go on, its weight is kept
        (over a reload and a restart too) until `undrain_instance`. Needs the admin token."""
        await self._call("POST", f"{self._instance(service_name, instance_id)}/drain")

    async def undrain_instance(self, service_name: str, instance_id: str) -> None:
        """Lifts `drain_instance`: new flows at the instance's weight again (through its slow
        start, as after a recovery)."""
        await self._call("POST", f"{self._instance(service_name, instance_id)}/undrain")

    async def services(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/services")

    async def health(self, service_name: Optional[str] = None) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/health", params={"service": service_name} if service_name else None)

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/stats")


async def _heartbeats(
    lb: LoadBalancer, service_name: str, instance_id: str, every: float, refused: Any
) -> None:
    """Heartbeats every `every` seconds until cancelled; the first refusal goes to `refused`
    and ends it."""
    try:
        while True:
            await asyncio.sleep(every)
            await lb.heartbeat(service_name, instance_id)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        refused(e)


class SyncLoadBalancer:
    """The same calls, blocking, for scripts: a LoadBalancer on an event loop of its own in a
    background thread. Use `with SyncLoadBalancer(...) as lb:` or call `close()`.

    `registration()` heartbeats from that thread; a refused heartbeat is raised when the block
    ends (a thread cannot interrupt a blocking script), and by every call made meanwhile."""

    def __init__(self, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lbclient", daemon=True)
        self._thread.start()
        self._failed: list[BaseException] = []

        async def make() -> LoadBalancer:
            return LoadBalancer(**kwargs)

        self._lb = self._run(make())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "SyncLoadBalancer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._lb.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __getattr__(self, name: str) -> Any:
        """Every coroutine method of LoadBalancer, blocking."""
        method = getattr(self._lb, name)
        if not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._failed:
                raise self._failed[0]
            return self._run(method(*args, **kwargs))

        return call

    @contextlib.contextmanager
    def registration(
        self,
        service_name: str,
        instance: ServiceInstance,
        ttl: float,
        deregister_after: Optional[float] = None,
        interval: Optional[float] = None,
    ) -> Iterator[None]:
        """As LoadBalancer.registration, heartbeating from the background thread."""
        every = ttl / 3 if interval is None else interval
        self._run(self._lb.register_instance(service_name, instance, ttl=ttl, deregister_after=deregister_after))

        beats = _heartbeats(self._lb, service_name, instance.id, every, self._failed.append)
        heart = asyncio.run_coroutine_threadsafe(beats, self._loop)
        try:
            yield
        finally:
            heart.cancel()
            with contextlib.suppress(NotFound):
                self._run(self._lb.deregister_instance(service_name, instance.id))
        if self._failed:
            raise self._failed.pop(0)

    def watch_instances(self, service_name: str, wait: float = 20.0) -> Iterator[InstancesChange]:
        """As LoadBalancer.watch_instances, as a blocking generator."""
        changes = self._lb.watch_instances(service_name, wait=wait)
        try:
            while True:
                try:
                    yield self._run(changes.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(changes.aclose())

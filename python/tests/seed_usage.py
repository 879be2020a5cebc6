"""The seed's usage example, as written, against a live daemon, then checks of what it did.

Run by the Rust end-to-end test: python seed_usage.py SOCKET SERVICE ADDRESS URL READ_TOKEN
(the service exists with other backends; ADDRESS is a reachable backend not yet registered).
Prints one line per check and a closing "N passed, N failed" line; exits 1 on any failure.
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbclient import (  # noqa: E402
    Conflict,
    Forbidden,
    InvalidRequest,
    LoadBalancer,
    NotFound,
    ServiceInstance,
    Unauthorized,
)

socket, service, address, url, read_token = sys.argv[1:6]
results = []


def check(what, ok, detail=""):
    results.append(ok)
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail else ""))


async def main():
    # The seed's example, with this test's names.
    lb = LoadBalancer(socket=socket)
    await lb.register_instance(service_name=service,
                               instance=ServiceInstance(id="auth-1", address=address, port=8080))
    instance = await lb.get_instance(service)
    await lb.update_instance_health(service_name=service, instance_id="auth-1", health_score=0.8)

    ids = {b["id"] for s in await lb.services() if s["name"] == service for b in s["backends"]}
    check("register_instance added auth-1", "auth-1" in ids, str(ids))
    check("get_instance returned a registered instance", instance.id in ids, repr(instance))
    check("get_instance came from the Maglev table", instance.source == "maglev", instance.source)
    health = await lb.health(service)
    auth1 = [b for b in health[0]["backends"] if b["id"] == "auth-1"][0]
    check("update_instance_health set the external score", auth1["external"]["score"] == 0.8, str(auth1["external"]))
    await lb.report_load(service, "auth-1", cpu=0.7, connections=12, ttl=60)
    auth1 = [b for b in (await lb.health(service))[0]["backends"] if b["id"] == "auth-1"][0]
    check("report_load stored the report", auth1["load"]["report"]["cpu"] == 0.7, str(auth1.get("load")))

    await lb.drain_instance(service, "auth-1")
    auth1 = [b for b in (await lb.health(service))[0]["backends"] if b["id"] == "auth-1"][0]
    check(
        "drain_instance drained it, its weight kept",
        auth1["state"] == "drained" and auth1["drain"]["reason"] == "operator"
        and auth1["effective_weight"] == 0 and auth1["weight"] == 100,
        str(auth1),
    )
    await lb.undrain_instance(service, "auth-1")
    auth1 = [b for b in (await lb.health(service))[0]["backends"] if b["id"] == "auth-1"][0]
    check("undrain_instance lifted it", auth1["drain"] is None and auth1["state"] != "drained", str(auth1))

    for call, exc, needle in [
        (lb.get_instance("no-such-service"), NotFound, "unknown service"),
        (lb.update_instance_health(service, "nope", 0.5), NotFound, "has no backend nope"),
        (lb.drain_instance(service, "nope"), NotFound, "has no backend nope"),
        (lb.update_instance_health(service, "auth-1", 1.5), InvalidRequest, "out of range"),
        (lb.report_load(service, "auth-1", cpu=1.5), InvalidRequest, "cpu 1.5 is out of range"),
        (lb.report_load(service, "auth-1"), InvalidRequest, "needs cpu, memory or connections"),
        (lb.register_instance(service, ServiceInstance(id="auth-1", address=address)), Conflict, "already has"),
        (lb.register_instance(service, ServiceInstance(id="bad id", address=address)), InvalidRequest, "invalid backend id"),
    ]:
        try:
            await call
            check(f"{exc.__name__} raised", False, "no exception")
        except exc as e:
            check(f"{type(e).__name__} raised with the API's detail", needle in e.detail, e.detail)

    await lb.deregister_instance(service, "auth-1")
    ids = {b["id"] for s in await lb.services() if s["name"] == service for b in s["backends"]}
    check("deregister_instance removed auth-1", "auth-1" not in ids, str(ids))
    await lb.aclose()

    # Over TCP: a read token reads, and may not change anything.
    async with LoadBalancer(url=url, token=read_token) as reader:
        check("a read token lists services", len(await reader.services()) > 0)
        try:
            await reader.set_weight(service, next(iter(ids)), 5)
            check("a read token is refused a change", False)
        except Forbidden as e:
            check("a read token is refused a change (Forbidden)", e.status == 403, e.detail)
    async with LoadBalancer(url=url) as nobody:
        try:
            await nobody.services()
            check("no token is refused", False)
        except Unauthorized as e:
            check("no token is refused (Unauthorized)", e.status == 401, e.detail)


asyncio.run(main())
failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)

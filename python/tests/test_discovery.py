"""The client's discovery calls against a live daemon: registration(), watch_instances() and
the synchronous wrapper, from the package `cargo xtask setup` installed (not the source tree).

Run by the Rust end-to-end test: python test_discovery.py SOCKET SERVICE ADDRESS
(the service exists; ADDRESS is a reachable backend not yet registered). Prints one line per
check and a closing "N passed, N failed" line; exits 1 on any failure.
"""

import asyncio
import sys
import time
from pathlib import Path

import lbclient
from lbclient import InvalidRequest, LoadBalancer, NotFound, ServiceInstance, SyncLoadBalancer

socket, service, address = sys.argv[1:4]
results = []


def check(what, ok, detail=""):
    results.append(bool(ok))
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail else ""), flush=True)


async def ids(lb):
    _, now = await lb.instances(service)
    return {i.id: i for i in now}


async def next_change(changes, want, bound=5.0):
    """The next change the watch yields that satisfies `want`, within `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            change = await asyncio.wait_for(changes.get(), left)
        except asyncio.TimeoutError:
            return None
        if want(change):
            return change


async def main():
    site = Path(lbclient.__file__).resolve()
    check("lbclient comes from the installed package", "site-packages" in site.parts, str(site))
    check("it carries py.typed", (site.parent / "py.typed").is_file())
    check("and a version", lbclient.__version__.count(".") == 2, lbclient.__version__)

    lb = LoadBalancer(socket=socket)
    inst = ServiceInstance(id="auth-1", address=address)

    # A watch running beside everything below.
    changes: asyncio.Queue = asyncio.Queue()

    async def watch():
        async for change in lb.watch_instances(service, wait=5):
            await changes.put(change)

    watcher = asyncio.create_task(watch())
    first = await next_change(changes, lambda c: True)
    check("the watch yields the instances at once", first is not None and len(first.added) == len(first.instances) > 0,
          repr(first and [i.id for i in first.instances]))

    # The block keeps the instance registered past its TTL, heartbeating.
    registered_at = time.monotonic()
    async with lb.registration(service_name=service, instance=inst, ttl=2):
        added = await next_change(changes, lambda c: any(i.id == "auth-1" for i in c.added))
        seen = time.monotonic() - registered_at
        check("the watch sees the registration", added is not None, f"{seen * 1000:.0f} ms after the call")
        print(f"watch latency: registration seen {seen * 1000:.0f} ms after the call", flush=True)
        await asyncio.sleep(3)
        now = await ids(lb)
        check("still registered and serving past its ttl", "auth-1" in now and now["auth-1"].state == "up"
              and now["auth-1"].serving, repr(now.get("auth-1")))
    now = await ids(lb)
    check("deregistered when the block ends", "auth-1" not in now, str(sorted(now)))
    removed = await next_change(changes, lambda c: any(i.id == "auth-1" for i in c.removed))
    check("the watch sees the removal", removed is not None)

    # A heartbeat the daemon refuses interrupts the block with the API's error.
    other = LoadBalancer(socket=socket)
    raised = None
    started = time.monotonic()
    try:
        async with lb.registration(service_name=service, instance=inst, ttl=1.5):
            await other.deregister_instance(service, "auth-1")  # behind the block's back
            await asyncio.sleep(10)
    except NotFound as e:
        raised = e
    took = time.monotonic() - started
    check("a refused heartbeat raises NotFound in the block", raised is not None and "has no backend auth-1" in raised.detail,
          repr(raised))
    check("within one heartbeat interval", took < 1.5, f"{took:.2f} s")
    check("the task is not left cancelled", asyncio.current_task().cancelling() == 0)

    # Cancelled: still deregistered.
    entered = asyncio.Event()

    async def body():
        async with lb.registration(service_name=service, instance=inst, ttl=2):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await asyncio.wait_for(entered.wait(), 5)
    check("registered inside the cancelled block", "auth-1" in await ids(lb))
    task.cancel()
    try:
        await task
        check("the cancel propagates", False)
    except asyncio.CancelledError:
        check("the cancel propagates", True)
    check("deregistered on cancellation", "auth-1" not in await ids(lb))

    # Bad terms: refused whole, nothing registered.
    for ttl, extra, needle in [(0, None, "ttl 0 s is out of range"), (1e9, None, "out of range"),
                               (5, 0, "deregister_after 0 s is out of range")]:
        try:
            async with lb.registration(service_name=service, instance=inst, ttl=ttl, deregister_after=extra):
                pass
            check(f"ttl {ttl} refused", False)
        except InvalidRequest as e:
            check(f"ttl {ttl} / deregister_after {extra} refused in one line", needle in e.detail and "\n" not in e.detail,
                  e.detail)
    check("nothing registered by them", "auth-1" not in await ids(lb))
    try:
        await lb.heartbeat(service, "no-such")
        check("a heartbeat to an unknown id is refused", False)
    except NotFound as e:
        check("a heartbeat to an unknown id is refused (NotFound)", "has no backend no-such" in e.detail, e.detail)

    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await other.aclose()
    await lb.aclose()


def sync_part():
    with SyncLoadBalancer(socket=socket) as lb:
        watch = lb.watch_instances(service, wait=5)
        first = next(watch)
        check("sync: the watch yields the instances", len(first.instances) > 0)
        with lb.registration(service_name=service, instance=ServiceInstance(id="sync-1", address=address), ttl=2):
            change = next(watch)
            check("sync: the watch sees the registration", any(i.id == "sync-1" for i in change.added),
                  repr([i.id for i in change.added]))
            time.sleep(2.5)
            _, now = lb.instances(service)
            check("sync: heartbeats keep it past its ttl", any(i.id == "sync-1" and i.serving for i in now))
        _, now = lb.instances(service)
        check("sync: deregistered after the block", all(i.id != "sync-1" for i in now))
        watch.close()


asyncio.run(main())
sync_part()
failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)

"""The client refuses ids that are no path segment and percent-encodes the others.

No daemon needed: python3 python/tests/test_ids.py (exits 1 on a failed assert). Without
httpx installed, a stub stands in for it; with httpx, the requests go through its
MockTransport, so what is checked is the path httpx would really send.
"""

import asyncio
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import httpx
except ImportError:  # a stub: the client only names these two when it is made
    httpx = None
    stub = types.ModuleType("httpx")
    stub.AsyncHTTPTransport = lambda **kw: None
    stub.AsyncClient = lambda **kw: None
    sys.modules["httpx"] = stub

from lbclient import LoadBalancer, ServiceInstance  # noqa: E402

sent = []


class Response:
    status_code = 200
    is_success = True
    text = ""

    def json(self):
        return {"data": {"backend": "b", "address": "10.0.0.1", "source": "maglev"}}


class Recorder:
    """Stands in for httpx.AsyncClient: records each request's method and path."""

    async def request(self, method, path, json=None, params=None):
        sent.append((method, path))
        return Response()

    async def aclose(self):
        pass


def client():
    lb = LoadBalancer(url="http://lb")
    if httpx is None:
        lb._http = Recorder()
    else:

        def handler(request):
            sent.append((request.method, request.url.raw_path.decode()))
            return httpx.Response(200, json=Response().json())

        lb._http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://lb")
    return lb


async def refused(call, needle):
    try:
        await call
    except ValueError as e:
        assert needle in str(e), f"{e!r} should mention {needle!r}"
        assert "\n" not in str(e), f"one line: {e!r}"
    else:
        raise AssertionError(f"{call} was not refused")


async def main():
    lb = client()
    bad_ids = ["..", ".", "", "a\x1b[2J", "a\rb", "a\nb", "a\x00b", "a\x85b"]
    for bad in bad_ids:
        await refused(lb.deregister_instance("web", bad), "invalid instance id")
        await refused(lb.update_instance_health("web", bad, 0.5), "invalid instance id")
        await refused(lb.report_load("web", bad, cpu=0.5), "invalid instance id")
        await refused(lb.set_weight("web", bad, 10), "invalid instance id")
        await refused(lb.deregister_instance(bad, "b1"), "invalid service name")
        await refused(lb.get_instance(bad), "invalid service name")
        await refused(lb.register_instance("web", ServiceInstance(id=bad, address="10.0.0.1")), "invalid instance id")
    assert sent == [], f"nothing is sent for a refused id: {sent}"

    # The seed's bug: ".." used to become DELETE /v1/services/web, the whole service.
    await lb.deregister_instance("web", "b1")
    await lb.deregister_instance("a/b", "x?y#z")
    await lb.deregister_instance("web", "...")
    await lb.set_weight("web", "%2e%2e", 10)
    await lb.get_instance("w eb")
    assert sent == [
        ("DELETE", "/v1/services/web/instances/b1"),
        ("DELETE", "/v1/services/a%2Fb/instances/x%3Fy%23z"),
        ("DELETE", "/v1/services/web/instances/..."),
        ("PUT", "/v1/services/web/instances/%252e%252e/weight"),
        ("GET", "/v1/services/w%20eb/pick"),
    ], sent
    await lb.aclose()
    print(f"test_ids: ok ({'httpx ' + httpx.__version__ if httpx else 'stub transport'})")


asyncio.run(main())

"""The status page in Debian's Chromium, driven by Selenium through chromium-driver.

Run by tests/tests/e2e_status.rs inside the balancer's namespace, against a live daemon under
traffic. One argument: a JSON object with
  metrics     base URL of the metrics listener (no token)
  api         base URL of the TCP API, and read_token, a token that may read
  backends    [[service, backend], ...]: every row the page must show
  markup      {"label": text, "agent": text}: what a backend controls, holding markup
  stop        [service, backend]: the backend whose server the test stops when told
  drain       [service, backend]: the backend the test drains (lb backend drain) when told
  screenshot  where to save the screenshot
The script prints `READY TO STOP` and waits for a line on stdin once the page is live; the test
stops the backend's server and answers. Then `READY TO DRAIN`, answered once the test has
drained the other backend. Every wait is bounded. The last line says
`status page: N passed, 0 failed`, or the script exits non-zero with the failure.
"""

import base64
import json
import os
import shutil
import sys
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
FIX = "fix: cargo xtask setup installs Debian's chromium and chromium-driver, and selenium into target/py"


class Failed(Exception):
    pass


def need_browser():
    """One line naming the fix when the browser, its driver or Selenium is missing."""
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            sys.exit(f"status page test: {path} is missing (Debian package {package}; {FIX})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        sys.exit(f"status page test: the selenium module is missing from {sys.executable} ({FIX})")


def browser(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        # Root in a test namespace: Chromium's own sandbox needs user namespaces it may not get.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,900",
        f"--user-data-dir={profile}",
        "--no-first-run",
        # Nothing but the daemon: no update, sync, safe-browsing or metrics traffic.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-pings",
        "--metrics-recording-only",
        "--disable-features=Translate,OptimizationHints,MediaRouter",
    ):
        opts.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    except Exception as e:  # the driver's own message, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Failed(f"Chromium did not start through {DRIVER}: {first} ({FIX})")


def wait(what, cond, timeout, show=lambda: ""):
    """cond() until it returns something true, polling; fails after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= end:
            raise Failed(f"{what}: not within {timeout} s. {show()}")
        time.sleep(0.05)


ROWS = """return [...document.querySelectorAll('#backends tbody tr')].map(tr => ({
    service: tr.dataset.service, backend: tr.dataset.backend, state: tr.dataset.state,
    changed: tr.classList.contains('changed'),
    cells: Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.textContent])),
}));"""

SERVICES = """return Object.fromEntries([...document.querySelectorAll('#services tbody tr')].map(tr =>
    [tr.dataset.service, Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.textContent]))]));"""


def main():
    need_browser()
    args = json.loads(sys.argv[1])
    profile = tempfile.mkdtemp(prefix="lb-status-chromium-")
    drv = None
    passed = 0
    try:
        drv = browser(profile)
        drv.set_script_timeout(5)

        def rows():
            return drv.execute_script(ROWS)

        def show():
            error = drv.execute_script("return document.getElementById('error').textContent")
            return f"error banner: {error!r}; rows: {json.dumps(rows())[:2000]}"

        # 1. Every backend, on the metrics listener without a token.
        started = time.monotonic()
        drv.get(args["metrics"] + "/status")
        want = sorted(tuple(x) for x in args["backends"])
        wait(
            "every backend in the table",
            lambda: sorted((r["service"], r["backend"]) for r in rows()) == want,
            10,
            show,
        )
        print(f"page: every backend shown {time.monotonic() - started:.2f} s after the load")
        # The attached interfaces, each with its mode and XDP TX error count.
        want_ifaces = [tuple(x) for x in args["interfaces"]]
        ifaces = drv.execute_script(
            "return [...document.querySelectorAll('#interfaces .iface')]"
            ".map(e => [e.dataset.interface, e.dataset.mode, e.dataset.txErrors ?? null])"
        )
        if [tuple(i[:2]) for i in ifaces] != want_ifaces or any(i[2] is None for i in ifaces):
            raise Failed(f"interfaces shown {ifaces}, want {want_ifaces} with their XDP TX errors")
        print(f"page: interfaces {ifaces}")
        passed += 1
        # A reload would clear this; the end checks it is still there.
        drv.execute_script("window.__sameLoad = 'yes'")

        # 2. What backends control is text, never markup.
        label, agent = args["markup"]["label"], args["markup"]["agent"]
        texts = [r["cells"].get("labels", "") for r in rows()] + [r["cells"].get("agent", "") for r in rows()]
        if not any(label in t for t in texts):
            raise Failed(f"the label {label!r} is not shown as text: {texts}")
        wait("the agent's reply shown as text", lambda: any(agent in r["cells"].get("agent", "") for r in rows()), 10, show)
        injected = drv.execute_script(
            "return {img: document.querySelectorAll('img').length,"
            " inline: document.querySelectorAll('script:not([src])').length,"
            " b: document.querySelectorAll('#backends b').length, pwned: window.__pwned ?? null}"
        )
        if injected != {"img": 0, "inline": 0, "b": 0, "pwned": None}:
            raise Failed(f"markup from a backend became elements or ran: {injected}")
        print(f"escaping: label and agent reply shown as text, nothing injected ({injected})")
        passed += 1

        # 3. Live rates: the traffic the test sends shows as packets/s.
        def rate(service, col):
            text = drv.execute_script(SERVICES).get(service, {}).get(col, "–")
            return float(text) if text not in ("–", "") else 0.0

        busy = args["busy"]
        wait(f"{busy} packets/s above zero", lambda: rate(busy, "pps") > 0, 10, lambda: str(drv.execute_script(SERVICES)))
        print(f"rates: {busy} at {rate(busy, 'pps'):.0f} packets/s")
        passed += 1

        # 4. The test stops a backend's server; the page shows it down, without a reload.
        service, backend = args["stop"]
        updates_before = int(drv.execute_script("return document.body.dataset.updates"))
        print("READY TO STOP", flush=True)
        if sys.stdin.readline().strip() != "stopped":
            raise Failed("the test did not say it stopped the server")
        stopped = time.monotonic()

        def down():
            return [r for r in rows() if r["service"] == service and r["backend"] == backend and r["state"] == "down"]

        row = wait(f"{service}/{backend} shown down", down, 10, show)[0]
        took = time.monotonic() - stopped
        if not row["changed"]:
            raise Failed(f"{service}/{backend} went down but does not stand out as changed: {row}")
        same = drv.execute_script("return window.__sameLoad")
        updates = int(drv.execute_script("return document.body.dataset.updates"))
        if same != "yes" or updates <= updates_before:
            raise Failed(f"the page reloaded or stopped updating (same load: {same}, updates {updates_before} -> {updates})")
        print(f"down: {service}/{backend} shown down {took:.2f} s after its server stopped, marked as changed, same page load ({updates - updates_before} updates)")
        passed += 1

        # 4b. The operator drains a backend: the page shows the state and its reason, live.
        dservice, dbackend = args["drain"]
        print("READY TO DRAIN", flush=True)
        if sys.stdin.readline().strip() != "drained":
            raise Failed("the test did not say it drained the backend")
        drained_at = time.monotonic()

        def drained():
            return [
                r for r in rows()
                if r["service"] == dservice and r["backend"] == dbackend and r["state"] == "drained"
                and "by the operator" in r["cells"].get("state", "")
            ]

        row = wait(f"{dservice}/{dbackend} shown drained by the operator", drained, 10, show)[0]
        print(f"drain: {dservice}/{dbackend} shown drained {time.monotonic() - drained_at:.2f} s after lb backend drain: {row['cells'].get('state')!r}")
        passed += 1

        # 5. Sorting and filtering, as lb top: by backend name, then only one backend's rows.
        drv.find_element("css selector", "#backends th[data-col='id'] button").click()
        order = [(r["backend"], r["service"]) for r in rows()]
        if order != sorted(order):
            raise Failed(f"not sorted by backend: {order}")
        box = drv.find_element("css selector", "#filter")
        box.send_keys(backend)
        wait(f"only {backend}'s rows", lambda: {r["backend"] for r in rows()} == {backend}, 5, show)
        box.clear()
        box.send_keys(" ")  # an input event with an empty filter
        wait("every row again", lambda: len(rows()) == len(want), 5, show)
        drv.find_element("css selector", "#trouble").click()
        trouble = {(r["service"], r["backend"]) for r in rows()}
        if (service, backend) not in trouble or len(trouble) >= len(want):
            raise Failed(f"'only not up' shows {trouble}")
        drv.find_element("css selector", "#trouble").click()
        drv.find_element("css selector", "#backends th[data-col='pps'] button").click()
        print(f"sort and filter: by backend, '{backend}' alone, not-up only ({len(trouble)} rows)")
        passed += 1

        # The screenshot: the whole page, beyond the window, with the stopped backend down.
        wait("a fresh draw", lambda: int(drv.execute_script("return document.body.dataset.updates")) > updates, 5)
        size = drv.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = drv.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
        )
        with open(args["screenshot"], "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"screenshot: {args['screenshot']}")

        # 6. One service's page: its rows only.
        drv.get(args["metrics"] + "/status/service/" + service)
        wait(
            f"{service}'s page with its rows only",
            lambda: (lambda rs: rs and {r["service"] for r in rs} == {service})(rows()),
            10,
            show,
        )
        passed += 1

        # 7. The TCP API: the page asks for a token, and works with a read token in the fragment.
        drv.get(args["api"] + "/status")
        wait(
            "the token form on the API without a token",
            lambda: drv.execute_script(
                "return !document.getElementById('token-form').hidden"
                " && document.getElementById('error').textContent.includes('bearer token')"
            ),
            10,
            show,
        )
        drv.get(args["api"] + "/status#token=" + args["read_token"])
        wait("every backend through the API with the read token", lambda: len(rows()) == len(want), 10, show)
        if "token" in drv.current_url:
            raise Failed(f"the token stays in the address bar: {drv.current_url}")
        print("API: token form without a token, every backend with the read token (taken out of the URL)")
        passed += 1
    except Failed as e:
        print(f"FAILED: {e}", flush=True)
        print(f"status page: {passed} passed, 1 failed")
        return 1
    finally:
        if drv is not None:
            drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"status page: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The web UI (api/ui.py) in a real browser: headless Chromium driven by Selenium, against the
real app under uvicorn (`dmsae serve` in a subprocess, tests/serving.py) on the session's Ray
cluster, with real tiny runs. The tests share one server, one browser and the runs they
create, and build on each other in file order (run with -x).

Needs the Debian packages `chromium` and `chromium-driver` and the pip package `selenium`
(`scripts/setup.sh` installs them); without them the browser tests are skipped, saying so.
With ``DMSAE_UI_SCREENSHOTS=docs/ui`` each page is also saved there as a PNG (the pictures of
docs/ui.md and the README), and the transfer page shows a real `dmsae transfer` of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import tiny_config
from serving import ENV, REPO, TOKEN, Server, stop_leftover_jobs

CHROMIUM = (shutil.which("chromium") or shutil.which("chromium-browser")
            or shutil.which("google-chrome"))  # e.g. on CI images that ship Chrome
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = os.environ.get("DMSAE_UI_SCREENSHOTS")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
MISSING = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver (chromium-driver)",
                                 CHROMEDRIVER), ("selenium", HAVE_SELENIUM)) if not ok]


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module", autouse=True)
def _ray_env(monkeypatch_module):
    for k, v in ENV.items():
        monkeypatch_module.setenv(k, v)


@pytest.fixture(scope="module")
def server(ray_head, tmp_path_factory, tiny_dir) -> Iterator[Server]:
    root = str(tiny_dir["root"])  # the tiny model and corpus are local: allow their directory
    srv = Server(ray_head["dashboard"], tmp_path_factory.mktemp("ui"),
                 "--model-root", root, "--data-root", root)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_leftover_jobs(ray_head["dashboard"])


@pytest.fixture(scope="module")
def api(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def runs() -> dict:
    """Ids of the runs the tests create, shared in file order."""
    return {}


@pytest.fixture(scope="module")
def browser(server):
    if MISSING:
        pytest.skip(f"no headless browser: {', '.join(MISSING)} not installed "
                    "(scripts/setup.sh installs chromium, chromium-driver and selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def body(tiny_dir, **sections) -> dict:
    cfg = tiny_config(tiny_dir, Path("unused"), **sections)
    del cfg["run_dir"]  # the server chooses it
    return cfg


def wait(driver, pred, timeout: float = 120, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: pred(d))
    except Exception as err:
        raise AssertionError(f"timed out waiting for {what or pred}: {driver.current_url}\n"
                             f"{driver.find_element('tag name', 'body').text[:2000]}") from err


def css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def text_of(driver, selector: str) -> str:
    found = css(driver, selector)
    return found[0].text if found else ""


def shot(driver, name: str) -> None:
    """The whole page (up to 2400 px high) as docs/ui/<name>.png, with DMSAE_UI_SCREENSHOTS."""
    if not SHOTS:
        return
    out = (REPO / SHOTS).resolve()
    out.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1400, "height": min(max(height, 600), 2400), "deviceScaleFactor": 1,
        "mobile": False})
    time.sleep(0.8)  # charts redraw on resize
    path = out / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    from PIL import Image  # matplotlib's dependency: 256 colours, a third of the bytes

    with Image.open(path) as im:
        flat = im.convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    flat.save(path, optimize=True)


def login(driver, url: str, token: str = TOKEN) -> None:
    driver.get(f"{url}/ui/login")
    css(driver, "#token")[0].send_keys(token)
    css(driver, "#login")[0].click()


def wait_status(api: httpx.Client, run_id: str, pred, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = api.get(f"/v1/distillations/{run_id}").json()
        if pred(view):
            return view
        if time.monotonic() > deadline:
            logs = api.get(f"/v1/distillations/{run_id}/logs").text
            raise TimeoutError(f"run {run_id} stuck at {view}\n--- logs ---\n{logs[-4000:]}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- without a browser


def test_the_cache_format_is_shared_with_inspect():
    from api import ui_data as ui
    from dmsae_ray.tools import inspect_latents

    assert ui.INSPECT_FILE == inspect_latents.CACHE_FILE
    assert ui.INSPECT_VERSION == inspect_latents.CACHE_VERSION
    assert ui.INSPECT_PARAMS == inspect_latents.CACHE_DEFAULTS


def test_without_a_token_the_ui_is_open_on_loopback_only(tmp_path, monkeypatch):
    """No token: no login, the API's Host check (DNS rebinding), and no cross-origin changes."""
    from fastapi.testclient import TestClient

    from api.app import Settings, create_app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    app = create_app(Settings(runs_root=tmp_path / "runs", ray_address="http://127.0.0.1:9",
                              allowed_hosts=["testserver"]))
    with TestClient(app, follow_redirects=False) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and "No distillations yet" in page.text
        assert "Log out" not in page.text
        assert client.get("/ui").headers["location"] == "/ui/"
        assert client.get("/ui/login?next=/ui/sweeps").headers["location"] == "/ui/sweeps"
        assert client.get("/ui/", headers={"Host": "evil.example"}).status_code == 400
        stop = "/v1/distillations/0123456789ab/stop"
        assert client.post(stop).status_code == 404  # a client that is not a browser
        assert client.post(stop, headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.post(stop, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert client.post(stop, headers={"Origin": "http://testserver"}).status_code == 404
        assert client.get("/ui/runs/0123456789ab").status_code == 404


def test_session_cookie_and_csrf_rules(server, api):
    """The UI's cookie stands in for the token, on /ui and /v1, but never weakens the API: a
    wrong or forged cookie is no login, and a cookie request that changes something needs the
    UI's header and the same origin."""
    from api.security import SESSION_COOKIE

    base = server.url
    with httpx.Client(base_url=base, timeout=30) as anon:
        r = anon.get("/ui/")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/"
        assert anon.get("/ui/runs.json").status_code == 303
        assert anon.get("/v1/distillations").status_code == 401
        r = anon.post("/ui/login", data={"token": "wrong-token", "next": "/ui/"})
        assert r.status_code == 403 and "invalid token" in r.text
        assert SESSION_COOKIE not in r.cookies
        r = anon.post("/ui/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and SESSION_COOKIE not in r.cookies
        for forged in ("x", f"{int(time.time()) + 999}.abc", TOKEN):
            anon.cookies.set(SESSION_COOKIE, forged)
            assert anon.get("/v1/distillations").status_code == 401
            assert anon.get("/ui/").status_code == 303
        anon.cookies.clear()
        # An open redirect is no target after the login.
        r = anon.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/ui/"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        cookie = r.cookies[SESSION_COOKIE]
        set_cookie = r.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert TOKEN not in cookie
        anon.cookies.set(SESSION_COOKIE, cookie)
        page = anon.get("/ui/")
        assert page.status_code == 200 and "Distillations" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert anon.get("/v1/distillations").status_code == 200
        stop = "/v1/distillations/0123456789ab/stop"
        r = anon.post(stop)
        assert r.status_code == 403 and "X-Requested-With" in r.text
        ui = {"X-Requested-With": "dmsae-ui"}
        assert anon.post(stop, headers=ui).status_code == 404  # authenticated: no such run
        r = anon.post(stop, headers=ui | {"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert anon.post(stop, headers=ui | {"Origin": base}).status_code == 404
        # A bearer token still decides on its own, wrong ones are still refused.
        assert api.get("/ui/runs.json").status_code == 200
        r = anon.get("/v1/distillations", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403
        r = anon.post("/ui/logout", headers={"Origin": base})
        assert r.status_code == 303 and "max-age=0" in r.headers["set-cookie"].lower()
    assert httpx.get(f"{base}/ui/static/ui.js", timeout=30).status_code == 200  # public


# --------------------------------------------------------------------------- in the browser


def test_wrong_token_is_refused_and_the_right_one_logs_in(browser, server):
    browser.delete_all_cookies()
    browser.get(f"{server.url}/ui/")
    wait(browser, lambda d: "/ui/login" in d.current_url, 30, "the login page")
    shot(browser, "login")
    login(browser, server.url, "not-the-token")
    wait(browser, lambda d: css(d, "#login-error"), 30, "the refusal")
    assert text_of(browser, "#login-error") == "invalid token"
    assert not browser.get_cookies()
    browser.get(f"{server.url}/ui/runs.json")
    assert "/ui/login" in browser.current_url  # still no way in
    login(browser, server.url)
    wait(browser, lambda d: d.current_url.rstrip("/").endswith("/ui"), 30, "the runs list")
    assert css(browser, "#no-runs")
    cookie = browser.get_cookie("dmsae_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not for scripts


def test_the_run_page_follows_a_run_live(browser, server, api, tiny_dir, runs):
    # For the screenshot, more steps per cycle: a training curve with more than two points.
    train = {"tokens_per_cycle": 2**15, "log_every": 4} if SHOTS else {}
    r = api.post("/v1/distillations", json=body(tiny_dir, distill={"cycles": 3}, train=train),
                 headers={"X-Submitter": "ui-test"})
    assert r.status_code == 201, r.text
    rid = runs["main"] = r.json()["id"]
    browser.get(f"{server.url}/ui/runs/{rid}")
    wait(browser, lambda d: css(d, "#cycles"), 30, "the run page")
    before = len(css(browser, "#cycles tbody tr"))
    browser.execute_script("window.__stillTheSamePage = true")
    # Each committed cycle arrives as an event: a table row and a chart point, no reload.
    wait(browser, lambda d: len(css(d, "#cycles tbody tr")) >= 1, 240, "cycle 0's row")
    wait(browser, lambda d: len(css(d, "#cycles tbody tr")) == 4, 240, "every cycle's row")
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "completed", 120,
         "the completed status")
    assert before < 4  # the page was open before the cycles committed
    assert browser.execute_script("return window.__stillTheSamePage") is True
    assert css(browser, "#chart-core")[0].get_attribute("data-points") == "4"
    assert css(browser, "#chart-core canvas")
    cells = [c.text for c in css(browser, "#cycles tbody tr:first-child td")]
    assert cells[0] == "0" and cells[4] == "–"  # cycle 0 has no Jaccard
    view = api.get(f"/v1/distillations/{rid}").json()
    assert cells[2] == str(view["cycles"][0]["core_size"])
    # The training curve comes from the job's log: one line per cycle.
    wait(browser, lambda d: int(css(d, "#chart-train-mse")[0].get_attribute("data-points")) > 0,
         60, "the training curve")
    assert css(browser, "[data-action=stop]")[0].get_attribute("disabled") is not None
    assert css(browser, "[data-action=delete]")[0].get_attribute("disabled") is None
    shot(browser, "run")

    browser.get(f"{server.url}/ui/")
    row = f"tr[data-run-id='{rid}']"
    wait(browser, lambda d: css(d, row), 30, "the run in the list")
    assert text_of(browser, f"{row} [data-role=status]") == "completed"
    assert text_of(browser, f"{row} [data-role=progress-label]") == "4/4"


def test_the_core_browser_shows_contexts(browser, server, api, runs):
    rid = runs["main"]
    run_dir = server.root / "runs" / rid
    view = api.get(f"/v1/distillations/{rid}").json()
    last = len(view["cycles"]) - 1
    cache = run_dir / "cycles" / f"{last:03d}" / "inspect.json"
    assert not cache.exists()
    browser.get(f"{server.url}/ui/runs/{rid}/core")
    wait(browser, lambda d: css(d, "#latents"), 30, "the core table")
    assert "distilled core" in text_of(browser, "#core-title")
    assert len(css(browser, "tr.latent")) == view["core_size"]
    # Computed once in the background (the page says so), then the page fills itself in.
    wait(browser, lambda d: css(d, "ol.ctx li mark"), 240, "the top-activating contexts")
    assert cache.is_file()
    first = css(browser, "tr.latent")[0]
    core = json.loads((run_dir / "core" / "core.json").read_text())
    cells = [c.text for c in first.find_elements("css selector", "td")]
    assert cells[1] == "{}:{}".format(*core["ids"][0])  # the best-scored latent first
    assert cells[3] == str(core["origin_cycle"][0])
    assert cells[4] == f"{core['selection_counts'][0]} of {len(view['cycles'])}"
    shot(browser, "core")
    # The second load reads the cache: no computing.
    browser.get(f"{server.url}/ui/runs/{rid}/core")
    assert css(browser, "#contexts-state")[0].get_attribute("data-state") == "ready"
    assert css(browser, "ol.ctx li mark")

    # Contexts are corpus text: shown as text, never run as markup.
    c0 = json.loads((run_dir / "cycles" / "000" / "core.json").read_text())
    hostile = {"value": 9.5, "block": 0, "position": 1, "before": "<script>window.__xss=1</script>",
               "token": "<img src=x onerror=\"window.__xss=2\">", "after": "</td></tr>&amp;"}
    latents = [{"cycle": 0, "index": i, "id": "0:0", "frozen_core": False, "selected": True,
                "times_selected": 1, "density": 0.5, "tokens": 10, "top": [hostile]}
               for i in c0["indices"]]
    (run_dir / "cycles" / "000" / "inspect.json").write_text(json.dumps(
        {"version": 1, "cycle": 0, "top": 10, "window": 8, "source": "heldout",
         "computed_at": time.time(), "seconds": 0.0, "latents": latents}))
    browser.get(f"{server.url}/ui/runs/{rid}/core?cycle=0")
    wait(browser, lambda d: css(d, "ol.ctx li mark"), 30, "the planted contexts")
    assert browser.execute_script("return window.__xss") is None
    text = text_of(browser, "ol.ctx li")
    assert "<script>window.__xss=1</script>" in text and "&amp;" in text
    assert text_of(browser, "ol.ctx li mark") == hostile["token"]
    assert not css(browser, "ol.ctx img")


def test_the_transfer_page_plots_metric_against_measured_l0(browser, server, api, runs):
    rid = runs["main"]
    run_dir = server.root / "runs" / rid
    browser.get(f"{server.url}/ui/runs/{rid}/transfer")
    assert css(browser, "#no-transfer")
    if SHOTS:  # the screenshot shows a real (small) transfer of this run
        from dmsae_ray.tools.transfer import run_transfer

        run_transfer(run_dir, [4, 8, 16], seeds=2, log=lambda s: None)
    else:  # the page's input as `dmsae transfer` writes it, without training 18 SAEs
        from dmsae_ray.tools.transfer import METRICS, write_table

        rows = [{"k": k, "variant": v, "seed": s, "core_size": 3, "run_dir": "x"}
                | {m: 0.5 + 0.01 * k + 0.02 * s + (0.05 if v == "distilled" else 0)
                   for m in METRICS} | {"l0": float(k) + s}
                for k in (4, 8, 16) for v in ("distilled", "baseline", "random")
                for s in (0, 1)]
        write_table(rows, run_dir / "transfer", run_dir, 3)
    browser.get(f"{server.url}/ui/runs/{rid}")
    wait(browser, lambda d: css(d, "#transfer-link"), 30, "the transfer link")
    css(browser, "#transfer-link")[0].click()
    wait(browser, lambda d: css(d, "#chart-transfer-fve canvas"), 30, "the transfer charts")
    assert len(css(browser, "#points tbody tr")) == 9  # 3 variants x 3 k
    assert css(browser, "#chart-transfer-fve")[0].get_attribute("data-points") != "0"
    assert css(browser, "#verdicts tbody tr")
    shot(browser, "transfer")


def test_the_stop_button_stops_a_run_and_delete_removes_it(browser, server, api, tiny_dir, runs):
    slow = {"tokens_per_cycle": 2**22 if SHOTS else 2**20, "log_every": 500,
            "checkpoint_every": 1000}
    r = api.post("/v1/distillations", json=body(tiny_dir, distill={"cycles": 3}, train=slow))
    assert r.status_code == 201, r.text
    rid = runs["stop"] = r.json()["id"]
    browser.get(f"{server.url}/ui/runs/{rid}")
    stop = "[data-action=stop]"
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "running", 120, "running")
    if SHOTS:  # the runs list with a run in training
        browser.get(f"{server.url}/ui/")
        row = f"tr[data-run-id='{rid}']"
        wait(browser, lambda d: re.search(r"train [1-9]\d*%", text_of(d, row)), 120,
             "the run training, in the list")
        shot(browser, "runs")
        browser.get(f"{server.url}/ui/runs/{rid}")
        wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "running", 30, "running")
    assert css(browser, stop)[0].get_attribute("disabled") is None
    css(browser, stop)[0].click()
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") in ("stopping", "stopped"), 30,
         "the stop")
    view = api.get(f"/v1/distillations/{rid}").json()
    assert view["status"] in ("stopping", "stopped")
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "stopped", 120, "stopped")
    assert api.get(f"/v1/distillations/{rid}").json()["ray_job"]["status"] == "STOPPED"
    assert css(browser, stop)[0].get_attribute("disabled") is not None
    assert css(browser, "[data-action=resume]")[0].get_attribute("disabled") is None
    browser.get(f"{server.url}/ui/")
    wait(browser, lambda d: len(css(d, "tr[data-run-id]")) == 2, 30, "both runs in the list")
    assert text_of(browser, f"tr[data-run-id='{rid}'] [data-role=status]") == "stopped"

    browser.get(f"{server.url}/ui/runs/{rid}")
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "stopped", 30, "the run page")
    css(browser, "[data-action=delete]")[0].click()
    wait(browser, lambda d: _alert(d), 10, "the confirmation")
    browser.switch_to.alert.accept()
    wait(browser, lambda d: d.current_url.rstrip("/").endswith("/ui"), 60, "the runs list")
    assert api.get(f"/v1/distillations/{rid}").status_code == 404
    assert not css(browser, f"tr[data-run-id='{rid}']")
    assert css(browser, f"tr[data-run-id='{runs['main']}']")


def _alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 (raises without one)
        return True
    except NoAlertPresentException:
        return False


def test_sweep_pages_show_the_table_and_plots(browser, server, api, tiny_dir):
    cfg = body(tiny_dir, distill={"cycles": 2 if SHOTS else 1})
    taus = [0.5, 0.7, 0.9] if SHOTS else [0.5, 0.9]
    cfg["sweep"] = {"grid": {"distill.tau": taus}}
    r = api.post("/v1/sweeps", json=cfg)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    browser.get(f"{server.url}/ui/sweeps")
    wait(browser, lambda d: css(d, f"tr[data-sweep-id='{sid}'] a"), 30, "the sweep in the list")
    css(browser, f"tr[data-sweep-id='{sid}'] a")[0].click()
    wait(browser, lambda d: len(css(d, "#trials tbody tr")) == len(taus), 30, "a row per trial")
    # The page follows the sweep: rows fill in and the plots get a line per trial.
    wait(browser, lambda d: text_of(d, "h1 [data-role=status]") == "completed", 400,
         "the sweep's end")
    cycles = str(cfg["distill"]["cycles"] + 1)
    wait(browser, lambda d: css(d, "#chart-sweep-jaccard")[0].get_attribute("data-points")
         == cycles, 30, "the per-cycle plots")
    statuses = [e.text for e in css(browser, "#trials tbody .status")]
    assert statuses == ["completed"] * len(taus)
    heads = [e.text for e in css(browser, "#trials thead th")]
    assert "distill.tau" in heads and "core_size" in heads
    shot(browser, "sweep")
    browser.get(f"{server.url}/ui/sweeps")
    assert text_of(browser, f"tr[data-sweep-id='{sid}'] [data-role=status]") == "completed"
    shot(browser, "sweeps")

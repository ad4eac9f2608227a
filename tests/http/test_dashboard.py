"""The dashboard: its JSON, when it answers, under a mount prefix, and the page in a real browser."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Response

from serve_core import BackendConfig, Serve, ValidationError, accept_batch
from serve_core.http.dashboard import DATA, MAX_ERRORS, PAGE, dashboard_enabled
from serve_core.http.granian import ENV_URL, dashboard_option
from serve_core.http.server import HTTPServer
from serve_core.recent_errors import MAX_RECENT_ERRORS, error_id
from serve_core.testing import FakeClock

from ..conftest import WAIT, require
from .helpers import base_url

CHROMIUM_FLAGS = [  # the flags the machine's probe used; playwright adds --headless and a new empty profile
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _deploy(srv: Serve, fail: bool = False) -> None:
    def echo(request: Any) -> str:
        if fail or request.args.get("fail"):
            raise ValueError("secret detail")
        return "hi"

    srv.create_endpoint("echo", "/echo", methods=["GET", "POST"])
    srv.create_endpoint("py", None)
    srv.create_backend(echo, "echo:v1")
    srv.create_backend(echo, "echo:v2")
    srv.split("echo", {"echo:v1": 0.75, "echo:v2": 0.25})


def _host_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    return Response("host app")(environ, start_response)


# ------------------------------------------------------------------ the JSON
def test_data_has_endpoints_backends_instances_history_and_errors(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock, dashboard=True)
    _deploy(srv)
    client = Client(srv.wsgi_app())
    clock.advance(1.0)  # the first point
    for _ in range(4):
        client.get("/echo")
    clock.advance(1.0)
    response = client.get(DATA)
    assert response.status_code == 200 and response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    data = response.get_json()
    assert set(data) == {
        "version", "time", "instance", "interval_s", "horizon_s",
        "endpoints", "backends", "instances", "history", "errors",
    }
    assert data["version"] == 1 and data["interval_s"] == 1.0 and data["horizon_s"] == 600.0
    assert data["instance"]["id"] == srv.instance_id and data["instance"]["state"] == "running"
    assert data["instance"]["executor"] == "inline" and data["instance"]["debug"] is False
    echo, py = data["endpoints"]
    assert echo == {
        "name": "echo", "route": "/echo", "methods": ["GET", "POST"], "traffic": {"echo:v1": 0.75, "echo:v2": 0.25},
        "requests": 4, "errors": 0, "waiting": 0,
    }
    assert py["name"] == "py" and py["route"] is None and py["traffic"] == {}
    v1, v2 = data["backends"]
    assert v1["tag"] == "echo:v1" and v2["tag"] == "echo:v2"
    assert set(v1) == {
        "tag", "executor", "max_batch_size", "recent_batch_size", "desired", "running", "ready", "queue", "in_flight",
        "requests", "errors", "instances",
    }
    assert (v1["executor"], v1["desired"], v1["running"], v1["ready"], v1["queue"], v1["in_flight"]) == (
        "inline", 1, 1, 1, 0, 0
    )
    assert v1["requests"] + v2["requests"] == 4
    assert v1["instances"] == {srv.instance_id: {"desired": 1, "running": 1}}
    assert [inst["id"] for inst in data["instances"]] == [srv.instance_id] and data["instances"][0]["this"]
    history = data["history"]
    assert history["seq"] == 2 and len(history["t"]) == 2
    assert history["endpoints"]["echo"]["rps"] == [None, 4.0]
    assert set(history["backends"]) == {"echo:v1", "echo:v2"}
    assert set(history["backends"]["echo:v1"]) == {"rps", "eps", "p50", "p95", "p99"}
    assert data["errors"] == []
    newer = client.get(DATA, query_string={"since": 1}).get_json()["history"]
    assert len(newer["t"]) == 1 and newer["endpoints"]["echo"]["rps"] == [4.0]


def test_http_500s_appear_with_their_error_id_and_type_but_no_traceback(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    _deploy(srv, fail=True)
    srv.link("echo", "echo:v1")
    client = Client(srv.wsgi_app())
    failed = client.get("/echo")
    assert failed.status_code == 500
    error_id = re.search(r"error id (\w+)", failed.get_data(as_text=True)).group(1)  # type: ignore[union-attr]
    (error,) = client.get(DATA).get_json()["errors"]
    assert error["id"] == error_id and error["type"] == "ValueError"
    assert (error["method"], error["path"], error["endpoint"], error["backend"]) == ("GET", "/echo", "echo", "echo:v1")
    assert "traceback" not in error and "message" not in error
    assert "secret detail" not in client.get(DATA).get_data(as_text=True)


def test_debug_mode_shows_the_message_and_traceback(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True, debug=True)
    _deploy(srv, fail=True)
    client = Client(srv.wsgi_app())
    assert client.get("/echo").status_code == 500
    (error,) = client.get(DATA).get_json()["errors"]
    assert error["message"] == "secret detail" and "ValueError: secret detail" in error["traceback"]
    assert error["backend"] in ("echo:v1", "echo:v2")  # the backend that answered, even under a split
    assert srv.stat()[f"{error['backend']}_error_counter"] == 1


def test_recent_errors_are_bounded(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    _deploy(srv, fail=True)
    srv.link("echo", "echo:v1")
    client = Client(srv.wsgi_app())
    ids = [client.get("/echo").get_data(as_text=True).split("error id ")[1][:12] for _ in range(MAX_ERRORS + 7)]
    errors = client.get(DATA).get_json()["errors"]
    assert [error["id"] for error in errors] == ids[-MAX_ERRORS:]  # the newest, oldest first


def test_errors_of_another_instance_in_the_process_are_not_shown(make_serve: Callable[..., Serve]) -> None:
    shown = make_serve(executor="inline", dashboard=True)
    shown.create_endpoint("other", "/other")
    shown.create_backend(lambda request: "ok", "other:v1")
    shown.link("other", "other:v1")
    failing = make_serve(executor="inline")
    _deploy(failing, fail=True)
    assert Client(failing.wsgi_app()).get("/echo").status_code == 500
    assert Client(shown.wsgi_app()).get(DATA).get_json()["errors"] == []


def test_handle_call_errors_are_listed_with_their_backend_kind_and_count(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock, dashboard=True)
    _deploy(srv, fail=True)
    srv.link("py", "echo:v2")

    @accept_batch
    def batch(requests: Any, *, value: list[int]) -> list[int]:
        raise ArithmeticError("the whole batch fails")

    srv.create_endpoint("sum", None)
    srv.create_backend(batch, "sum:v1", backend_config=BackendConfig(max_batch_size=4, batch_wait_timeout_s=1.0))
    srv.link("sum", "sum:v1")
    with pytest.raises(ValueError, match="secret detail"):
        srv.get_handle("py").remote().result(WAIT)
    futures = [srv.get_handle("sum").remote(value=n) for n in range(3)]
    clock.advance(1.0)  # the batch's wait is over: one call of the three
    for future in futures:
        with pytest.raises(ArithmeticError):
            future.result(WAIT)
    py_error, batch_error = Client(srv.wsgi_app()).get(DATA).get_json()["errors"]
    assert (py_error["endpoint"], py_error["backend"], py_error["kind"], py_error["type"]) == (
        "py", "echo:v2", "user_error", "ValueError"
    )
    assert "method" not in py_error and py_error["count"] == 1 and "message" not in py_error
    assert (batch_error["endpoint"], batch_error["backend"]) == ("sum", "sum:v1")
    assert batch_error["type"] == "ArithmeticError"
    assert batch_error["count"] == 3  # one failure answering the batch's three queries: one entry
    assert [error["error_id"] for error in srv.recent_errors()] == [py_error["id"], batch_error["id"]]


def test_an_http_500_and_the_recent_error_share_one_id(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    _deploy(srv, fail=True)
    client = Client(srv.wsgi_app())
    body = client.post("/echo").get_data(as_text=True)
    (recorded,) = srv.recent_errors()
    assert f"error id {recorded['error_id']}" in body
    assert (recorded["method"], recorded["path"]) == ("POST", "/echo")  # the front added its request
    (shown,) = client.get(DATA).get_json()["errors"]
    assert shown["id"] == recorded["error_id"] and shown["method"] == "POST"


def test_the_instance_keeps_a_bounded_number_of_recent_errors(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    _deploy(srv, fail=True)
    srv.link("py", "echo:v1")
    handle = srv.get_handle("py")
    ids = []
    for _ in range(MAX_RECENT_ERRORS + 5):
        future = handle.remote()
        ids.append(error_id(future.exception(WAIT)))  # type: ignore[arg-type]
    assert [error["error_id"] for error in srv.recent_errors()] == ids[-MAX_RECENT_ERRORS:]


# ------------------------------------------------------------------ the page
def test_the_page_and_its_files_are_self_contained_and_relative(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    client = Client(srv.wsgi_app())
    page = client.get(PAGE)
    assert page.status_code == 200 and page.content_type == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(urls) == ["dashboard/app.css", "dashboard/app.js", "data:,"]  # relative: works under a prefix
    script = client.get("/-/dashboard/app.js")
    assert script.status_code == 200 and script.content_type == "text/javascript; charset=utf-8"
    assert '"dashboard/data?since="' in script.get_data(as_text=True)
    assert re.findall(r"\w+://[^\s\"']*", script.get_data(as_text=True)) == ["http://www.w3.org/2000/svg"]  # a name
    assert client.get("/-/dashboard/app.css").content_type == "text/css; charset=utf-8"


def test_the_dashboard_is_read_only(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    client = Client(srv.wsgi_app())
    for path in (PAGE, DATA):
        assert client.post(path).status_code == 405
        assert client.delete(path).status_code == 405
    assert client.head(PAGE).status_code == 200


def test_mounted_under_a_prefix(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    _deploy(srv)
    client = Client(DispatcherMiddleware(_host_app, {"/models": srv.wsgi_app()}))
    assert client.get("/models/-/dashboard").status_code == 200
    assert client.get("/models/-/dashboard/app.js").status_code == 200
    assert client.get("/models/echo").status_code == 200
    data = client.get("/models/-/dashboard/data").get_json()
    assert data["endpoints"][0]["requests"] == 1
    assert client.get("/-/dashboard").get_data() == b"host app"


def test_dashboard_app_serves_the_same_paths_anywhere(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", dashboard=True)
    _deploy(srv)
    client = Client(DispatcherMiddleware(_host_app, {"/ops": srv.dashboard_app()}))
    root = client.get("/ops/")
    assert root.status_code == 302 and root.headers["Location"].endswith("/ops/-/dashboard")
    assert client.get("/ops/-/dashboard").status_code == 200
    assert json.loads(client.get("/ops/-/dashboard/data").get_data())["backends"][0]["tag"] == "echo:v1"
    assert client.get("/ops/echo").status_code == 404  # only the dashboard: no endpoints here
    assert client.post("/ops/-/dashboard/data").status_code == 405


# ------------------------------------------------------------------ on or off
@pytest.mark.parametrize(
    ("option", "address", "env", "on"),
    [
        (None, ("127.0.0.1", 8000), {}, True),
        (None, ("::1", 8000), {}, True),
        (None, ("localhost", 8000), {}, True),
        (None, ("0.0.0.0", 8000), {}, False),
        (None, ("10.1.2.3", 8000), {}, False),
        (None, None, {}, False),  # mounted elsewhere: the instance cannot know what that listens on
        (None, None, {ENV_URL: "http://127.0.0.1:8000"}, True),  # serve-core run --server granian
        (None, None, {ENV_URL: "http://0.0.0.0:8000"}, False),
        (True, ("0.0.0.0", 8000), {}, True),
        (True, None, {}, True),
        (False, ("127.0.0.1", 8000), {}, False),
    ],
)
def test_who_gets_the_dashboard(option: bool | None, address: Any, env: dict[str, str], on: bool) -> None:
    assert dashboard_enabled(option, address, env) is on


@pytest.mark.parametrize(
    ("value", "option"), [("", None), ("auto", None), ("on", True), ("1", True), (" OFF ", False), ("0", False)]
)
def test_the_environment_variable_of_granian_workers(value: str, option: bool | None) -> None:
    assert dashboard_option(value) is option


def test_a_bad_environment_variable_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="SERVE_CORE_DASHBOARD must be on, off or auto"):
        dashboard_option("yes please")


def test_on_by_default_on_a_loopback_server(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", start_server=True, http_port=0, blocking=True)
    assert requests.get(base_url(srv) + PAGE, timeout=WAIT).status_code == 200


def test_off_answers_404_saying_how_to_turn_it_on(make_serve: Callable[..., Serve]) -> None:
    mounted = make_serve(executor="inline")  # no server of its own: off unless asked
    reply = Client(mounted.wsgi_app()).get(DATA)
    assert reply.status_code == 404 and "Serve(dashboard=True)" in reply.get_data(as_text=True)
    off = make_serve(executor="inline", start_server=True, http_port=0, blocking=True, dashboard=False)
    assert requests.get(base_url(off) + PAGE, timeout=WAIT).status_code == 404
    assert not off.dashboard_app().history.sampling


def test_the_option_is_validated(make_serve: Callable[..., Serve]) -> None:
    with pytest.raises(ValidationError, match="dashboard must be None, True or False"):
        make_serve(dashboard="yes")


# ------------------------------------------------------------------ in a real browser
@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian chromium driven by playwright; closed (and its processes gone) after the test."""
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium")
    require(chromium is not None, "no chromium on PATH (apt-get install chromium; scripts/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield instance
        finally:
            instance.close()


class PageErrors:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Any) -> None:
        self.seen: list[str] = []
        page.on("console", lambda message: self.seen.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.seen.append(f"uncaught: {error}"))


def _wait_text(page: Any, table: str, row: str, field: str, text: str) -> None:
    # A locator assertion (it retries until the timeout): the page's CSP forbids the eval of wait_for_function.
    from playwright.sync_api import expect

    expect(page.locator(_css(table, row, field))).to_have_text(text, timeout=WAIT * 1000)


def test_the_page_in_a_browser_shows_and_updates_the_numbers(
    make_serve: Callable[..., Serve], browser: Any, tmp_path: Any
) -> None:
    srv = make_serve(start_server=True, http_port=0, blocking=True)  # loopback: on by default
    _deploy(srv)
    srv.link("echo", "echo:v1")
    base = base_url(srv)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = PageErrors(page)
    page.goto(base + PAGE)
    _wait_text(page, "endpoints", "echo", "requests", "0")
    assert page.text_content(_css("endpoints", "echo", "route")) == "/echo"
    assert page.text_content(_css("endpoints", "echo", "methods")) == "GET, POST"
    assert "echo:v1 100%" in page.text_content(_css("endpoints", "echo", "traffic"))
    assert page.text_content(_css("endpoints", "py", "route")) == "(Python only)"
    assert page.text_content(_css("backends", "echo:v1", "executor")) == "thread"
    assert page.text_content(_css("backends", "echo:v1", "ready")) == "1"
    for _ in range(5):
        assert requests.get(base + "/echo", timeout=WAIT).status_code == 200
    assert requests.get(base + "/echo?fail=1", timeout=WAIT).status_code == 500
    _wait_text(page, "endpoints", "echo", "requests", "6")
    _wait_text(page, "backends", "echo:v1", "errors", "1")
    page.wait_for_selector('#errors tbody tr td[data-field="type"]', timeout=WAIT * 1000)
    assert page.text_content('#errors tbody tr td[data-field="type"]') == "ValueError"
    assert page.text_content('#errors tbody tr td[data-field="request"]') == "GET /echo"
    srv.link("py", "echo:v2")
    with pytest.raises(AttributeError):  # a handle call has no request.args: the backend fails
        srv.get_handle("py").remote().result(WAIT)
    handle_row = '#errors tbody tr:first-child td[data-field="request"]'
    from playwright.sync_api import expect

    expect(page.locator(handle_row)).to_have_text("handle call", timeout=WAIT * 1000)  # the newest first
    assert page.text_content('#errors tbody tr:first-child td[data-field="backend"]') == "echo:v2"
    chart_line = '#charts .card[data-kind="backend"][data-name="echo:v1"] svg path.series'
    page.wait_for_selector(chart_line, state="attached", timeout=WAIT * 1000)  # a flat line has no area
    assert page.text_content("#status").startswith("live")
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").read_bytes()[:4] == b"\x89PNG"
    page.close()
    assert errors.seen == []


def test_the_page_in_a_browser_under_a_mount_prefix(make_serve: Callable[..., Serve], browser: Any) -> None:
    srv = make_serve(dashboard=True)
    _deploy(srv)
    server = HTTPServer(DispatcherMiddleware(_host_app, {"/serve": srv.wsgi_app()}), "127.0.0.1", 0)
    try:
        server.wait_ready(WAIT)
        base = f"http://127.0.0.1:{server.address[1]}"
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(base + "/serve" + PAGE)
        _wait_text(page, "endpoints", "echo", "requests", "0")
        for _ in range(3):
            assert requests.get(base + "/serve/echo", timeout=WAIT).status_code == 200
        _wait_text(page, "endpoints", "echo", "requests", "3")
        assert page.text_content(_css("backends", "echo:v2", "tag")).strip() == "echo:v2"
        page.close()
        assert errors.seen == []
    finally:
        server.close()


def _css(table: str, row: str, field: str) -> str:
    return f'#{table} tr[data-name="{row}"] td[data-field="{field}"]'

"""`dcap serve`: the JSON API through Flask's test client, its limits and errors, the CLI
command, and the page in a real headless Chromium against a real server thread."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_captioner.cli import main
from diffusion_captioner.web import MAX_UPLOAD_BYTES, create_app
from diffusion_captioner.web.app import SAMPLES_DIR, list_samples, run_is_finished

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def tiny_run(tiny_clip_dir, tmp_path_factory) -> Path:
    """A run folder in the layout `dcap compare` writes (config.json + <decoder>/checkpoint/best)
    with every built-in decoder of the embedded preset, untrained, over the tiny CLIP: seconds,
    where training and scoring them through `compare` takes minutes on this CPU."""
    import registry
    from diffusion_captioner.encoders import encoder_config
    from diffusion_captioner.presets import decoder_plan, load_preset

    run = tmp_path_factory.mktemp("web") / "run"
    encoder_cfg = encoder_config(f"local-dir:{tiny_clip_dir}")
    dim = registry.build("encoder", {**encoder_cfg, "device": "cpu"}).dim
    preset = load_preset("embedded")
    plans = {}
    for name in registry.available("decoder"):
        if name not in preset["decoders"]:
            continue
        plans[name] = decoder_plan(preset, name)
        torch.manual_seed(0)
        decoder = registry.build("decoder", plans[name]["decoder"], feature_dim=dim)
        decoder.save_pretrained(run / name / "checkpoint" / "best")
    (run / "config.json").write_text(json.dumps(
        {"command": "test_web", "preset": "embedded", "encoder": encoder_cfg, "decoders": plans,
         "device": "cpu"}, indent=2))
    (run / "report.md").write_text("tiny\n")
    return run


@pytest.fixture(scope="module")
def app(tiny_run):
    app = create_app(tiny_run)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def png_bytes(size=(48, 40), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def post_image(client, data: bytes, name: str = "x.png", **fields):
    return client.post("/api/caption", data={"image": (io.BytesIO(data), name), **fields},
                       content_type="multipart/form-data")


def loaded_names(app) -> list[str]:
    return app.extensions["dcap"].names


def iterative(app) -> list[str]:
    return [n for n, info in app.extensions["dcap"].infos.items() if info.trajectory]


def assert_json_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.data[:500]
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), response.data[:500]
    assert "Traceback" not in response.get_data(as_text=True)
    for needle in needles:
        assert needle in body["error"], body["error"]
    return body["error"]


# ------------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------------
def test_decoders_endpoint_lists_what_is_loaded(client, app, tiny_run):
    body = client.get("/api/decoders").get_json()
    config = json.loads((tiny_run / "config.json").read_text())
    assert [d["name"] for d in body["decoders"]] == list(config["decoders"])
    assert body["max_upload_bytes"] == MAX_UPLOAD_BYTES
    for entry in body["decoders"]:
        assert {"name", "class", "kind", "trajectory", "default_steps", "step_options"} <= set(entry)
        assert entry["class"].rsplit(".", 1)[-1][0].isupper()
        if entry["kind"] == "iterative":
            assert entry["default_steps"] in entry["step_options"]
    by_name = {d["name"]: d for d in body["decoders"]}
    assert by_name["clipcap"]["kind"] == "autoregressive" and not by_name["clipcap"]["trajectory"]
    if "diffusion" in by_name:  # the decoder this page is about shows its steps
        assert by_name["diffusion"]["trajectory"] and by_name["diffusion"]["step_options"]


def test_good_image_captioned_by_every_decoder(client, app):
    response = post_image(client, png_bytes())
    assert response.status_code == 200, response.data[:500]
    answers = response.get_json()
    assert list(answers) == loaded_names(app)
    for name, answer in answers.items():
        assert isinstance(answer["caption"], str), name
        assert answer["ms"] >= 0
        assert answer["steps"] is None or answer["steps"] >= 1
        if name in iterative(app):
            trajectory = answer["trajectory"]
            assert len(trajectory) == answer["steps"] and trajectory[-1] == answer["caption"]
            assert all(isinstance(step, str) for step in trajectory)
        else:
            assert "trajectory" not in answer


def test_any_image_mode_is_accepted(client):
    for mode, color in (("L", 128), ("RGBA", (0, 0, 255, 100)), ("P", 3)):
        assert post_image(client, png_bytes(mode=mode, color=color)).status_code == 200, mode
    jpeg = io.BytesIO()
    Image.new("RGB", (30, 30), (0, 200, 0)).save(jpeg, format="JPEG")
    assert post_image(client, jpeg.getvalue(), "photo.jpg").status_code == 200


def test_steps_and_decoder_subset(client, app):
    names = iterative(app)
    if not names:
        pytest.skip("no loaded decoder returns a trajectory")
    response = post_image(client, png_bytes(), decoders=",".join(names), steps="2")
    assert response.status_code == 200, response.data[:500]
    answers = response.get_json()
    assert list(answers) == names
    for answer in answers.values():
        assert answer["steps"] == 2 and len(answer["trajectory"]) == 2
    plain = post_image(client, png_bytes(), decoders=names[0], steps="2", trajectory="0")
    assert "trajectory" not in plain.get_json()[names[0]]
    assert plain.get_json()[names[0]]["caption"] == answers[names[0]]["caption"]


def test_non_image_is_400_with_a_message(client):
    assert_json_error(post_image(client, b"%PDF-1.4 definitely not an image", "doc.pdf"), 400,
                      "not a readable image")
    assert_json_error(post_image(client, b"", "empty.png"), 400, "empty")
    truncated = png_bytes(size=(64, 64))[:60]
    assert_json_error(post_image(client, truncated), 400, "not a readable image")
    missing = client.post("/api/caption", data={"steps": "2"}, content_type="multipart/form-data")
    assert_json_error(missing, 400, "'image'")


def test_too_large_upload_is_413_with_a_message(client):
    response = post_image(client, b"\0" * (MAX_UPLOAD_BYTES + 1), "big.png")
    assert_json_error(response, 413, "10 MB")
    # just under the limit passes the size check (and then fails as a non-image)
    assert_json_error(post_image(client, b"\0" * (MAX_UPLOAD_BYTES - 1)), 400)


def test_decompression_bomb_is_refused_before_decoding(client):
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000), 0).save(buffer, format="PNG")  # 64 Mpx in a few KB
    assert_json_error(post_image(client, buffer.getvalue()), 400, "megapixels")


def test_unknown_decoder_is_400_naming_the_loaded_ones(client, app):
    response = post_image(client, png_bytes(), decoders="clipcap,no_such_decoder")
    error = assert_json_error(response, 400, "no_such_decoder")
    for name in loaded_names(app):
        assert name in error
    assert response.get_json()["available"] == loaded_names(app)


@pytest.mark.parametrize("steps", ["zero", "0", "100000", "2.5"])
def test_bad_steps_is_400(client, steps):
    assert_json_error(post_image(client, png_bytes(), steps=steps), 400, "steps")


def test_internal_error_is_json_without_traceback(client, app, monkeypatch, caplog):
    decoder = app.extensions["dcap"].loaded.decoders["clipcap"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/someone")

    monkeypatch.setattr(decoder, "generate", broken)
    with caplog.at_level("ERROR", logger="diffusion_captioner.web.app"):
        response = post_image(client, png_bytes(), decoders="clipcap")
    error = assert_json_error(response, 500, "internal server error")
    assert "secret" not in error and "secret" not in response.get_data(as_text=True)
    assert "secret detail" in caplog.text  # the traceback is logged server-side


def test_page_static_files_and_plain_errors(client):
    page = client.get("/")
    assert page.status_code == 200 and b"<script" in page.data
    samples = list_samples()
    assert len(samples) >= 3
    for name in samples:
        assert f"samples/{name}".encode() in page.data
        assert client.get(f"/static/samples/{name}").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and b"Traceback" not in missing.data
    assert client.get("/api/nothing").get_json()["status"] == 404
    assert client.get("/api/caption").status_code == 405


def test_uploads_stay_in_memory_and_nothing_is_written(client, tiny_run, monkeypatch):
    """A 2 MB upload (werkzeug spools those to a temporary file by default) is decoded in memory."""

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    noise = Image.frombytes("RGB", (900, 800), torch.randint(0, 256, (900 * 800 * 3,),
                                                            dtype=torch.uint8).numpy().tobytes())
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 2_000_000
    before = sorted(p for p in tiny_run.rglob("*"))
    assert post_image(client, buffer.getvalue(), decoders="clipcap").status_code == 200
    assert sorted(p for p in tiny_run.rglob("*")) == before


def test_concurrent_requests_are_safe(app):
    data = png_bytes(color=(30, 30, 200))
    expected = post_image(app.test_client(), data).get_json()
    answers, errors = [], []

    def worker():
        try:
            response = post_image(app.test_client(), data)
            answers.append((response.status_code, response.get_json()))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(answers) == 4
    for status, body in answers:
        assert status == 200
        assert {n: a["caption"] for n, a in body.items()} == \
            {n: a["caption"] for n, a in expected.items()}


# ------------------------------------------------------------------------------------------------
# production server: waitress, bounded queue, time limit
# ------------------------------------------------------------------------------------------------
def http_caption(base: str, data: bytes, timeout: float = 60.0, **fields: str):
    """POST /api/caption over real HTTP: (status, JSON body). A hung request raises (timeout)."""
    import urllib.error
    import urllib.request

    boundary = "dcapboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"'
                 f"\r\nContent-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base}api/caption", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def http_get(base: str, path: str, timeout: float = 30.0) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{base}{path}", timeout=timeout) as response:
        response.read()
        return response.status


@pytest.fixture
def waitress_server():
    """Start ``make_server`` for an app on 127.0.0.1 (a free port) in a thread; stopped after."""
    from diffusion_captioner.web import make_server, stop_server

    started = []

    def start(app):
        server = make_server(app, "127.0.0.1", 0)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread, app))
        return f"http://127.0.0.1:{server.effective_port}/"

    yield start
    for server, thread, app in started:
        stop_server(server, thread)
        app.extensions["dcap_admission"].close()
        assert not thread.is_alive()


def test_admission_bounds_running_and_waiting_requests():
    from diffusion_captioner.web.limits import Admission, Overloaded, TimedOut

    gate = Admission(workers=1, queue=1, timeout_s=60)
    release, running = threading.Event(), threading.Event()
    answers: list = []

    def blocked():
        running.set()
        release.wait(30)
        return "done"

    threads = [threading.Thread(target=lambda: answers.append(gate.run(blocked)))
               for _ in range(2)]
    threads[0].start()
    assert running.wait(30)
    threads[1].start()  # admitted: waits for the one worker
    for _ in range(3000):
        if gate.admitted == 2:
            break
        threading.Event().wait(0.01)
    assert gate.admitted == 2 == gate.capacity
    with pytest.raises(Overloaded, match="--workers/--queue"):
        gate.run(lambda: "never")
    release.set()
    for thread in threads:
        thread.join(30)
    assert answers == ["done", "done"] and gate.admitted == 0
    assert gate.run(lambda: 7) == 7  # the slots came back

    quick = Admission(workers=1, queue=0, timeout_s=0.2)
    stuck = threading.Event()
    with pytest.raises(TimedOut, match="--timeout"):
        quick.run(lambda: stuck.wait(30))
    stuck.set()  # the timed-out call finishes in the background and gives its slot back
    for _ in range(3000):
        if quick.admitted == 0:
            break
        threading.Event().wait(0.01)
    assert quick.run(lambda: "again") == "again"
    for bad in ({"workers": 0}, {"queue": -1}, {"timeout_s": 0}):
        with pytest.raises(ValueError, match="--"):
            Admission(**bad)
    gate.close()
    quick.close()


def test_waitress_holds_concurrent_clients_each_200_or_503(tiny_run, waitress_server):
    """8 concurrent clients x 3 requests over real HTTP: each a 200 or a JSON 503, none hangs
    (a client gives up after 60 s and that fails the test), and the server answers afterwards."""
    app = create_app(tiny_run, workers=1, queue=2, timeout_s=60)
    base = waitress_server(app)
    data = png_bytes(color=(30, 160, 30))
    statuses: list[int] = []
    errors: list[str] = []

    def client():
        for _ in range(3):
            try:
                status, body = http_caption(base, data, decoders="clipcap")
            except Exception as error:  # a hung or dropped request
                errors.append(f"{type(error).__name__}: {error}")
                continue
            statuses.append(status)
            if status == 503:
                assert "busy" in body["error"]
            elif status == 200:
                assert isinstance(body["clipcap"]["caption"], str)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=180)
    assert not errors and not any(thread.is_alive() for thread in clients)
    assert len(statuses) == 24 and set(statuses) <= {200, 503} and 200 in statuses
    assert http_get(base, "api/decoders") == 200 and http_get(base, "") == 200
    assert http_caption(base, data, decoders="clipcap")[0] == 200
    assert app.extensions["dcap_admission"].admitted == 0


def test_waitress_keeps_the_upload_limits_and_never_spools_to_disk(tiny_run, waitress_server,
                                                                    monkeypatch):
    """Over real HTTP: a 2 MB upload (waitress spools bodies over 512 KB to a temporary file by
    default) is captioned from memory; one over the 10 MB limit answers 413 JSON."""

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    base = waitress_server(create_app(tiny_run))  # its own app: the fixture closes its queue
    noise = Image.frombytes("RGB", (900, 800), torch.randint(0, 256, (900 * 800 * 3,),
                                                            dtype=torch.uint8).numpy().tobytes())
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 2_000_000
    assert http_caption(base, buffer.getvalue(), decoders="clipcap")[0] == 200
    status, body = http_caption(base, b"\0" * (MAX_UPLOAD_BYTES + 1))
    assert status == 413 and "upload too large" in body["error"]


def test_full_queue_answers_503_and_slow_request_504(tiny_run, waitress_server, monkeypatch):
    """Deterministic: captioning is held on an event, so 1 running + 1 waiting fill the gate and
    every further request must get a 503 JSON at once; a held request past --timeout gets 504."""
    app = create_app(tiny_run, workers=1, queue=1, timeout_s=60)
    service = app.extensions["dcap"]
    release = threading.Event()
    real_caption = service.caption
    monkeypatch.setattr(service, "caption",
                        lambda *a, **k: release.wait(60) and real_caption(*a, **k))
    base = waitress_server(app)
    data = png_bytes()
    held: list[int] = []
    threads = [threading.Thread(target=lambda: held.append(http_caption(base, data)[0]))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    gate = app.extensions["dcap_admission"]
    for _ in range(3000):
        if gate.admitted == 2:
            break
        threading.Event().wait(0.01)
    assert gate.admitted == 2
    for _ in range(3):
        status, body = http_caption(base, data)
        assert status == 503 and "busy" in body["error"] and body["status"] == 503
    assert http_get(base, "api/decoders") == 200  # the page and the API still answer
    release.set()
    for thread in threads:
        thread.join(60)
    assert held == [200, 200]

    slow = create_app(tiny_run, workers=1, queue=0, timeout_s=0.3)
    stuck = threading.Event()
    monkeypatch.setattr(slow.extensions["dcap"], "caption", lambda *a, **k: stuck.wait(60))
    slow_base = waitress_server(slow)
    status, body = http_caption(slow_base, data)
    stuck.set()
    assert status == 504 and "--timeout" in body["error"]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_serve_without_run_trains_the_embedded_default_first(tmp_path, monkeypatch):
    """No --run: `runs/embedded-<every decoder>` is trained through `compare` unless finished."""
    import registry
    from diffusion_captioner import cli, web

    calls: dict[str, list] = {"compare": [], "create_app": [], "serve": []}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.Commands, "compare",
                        lambda self, **kwargs: calls["compare"].append(kwargs))
    monkeypatch.setattr(web, "create_app",
                        lambda run, **kwargs: calls["create_app"].append(run) or "app")
    monkeypatch.setattr(web, "serve", lambda app, **kwargs: calls["serve"].append(kwargs))
    names = registry.available("decoder")
    default = Path("runs") / f"embedded-{'-'.join(names)}"

    assert main(["serve", "--port", "8123", "--quiet"]) == 0
    assert calls["compare"] == [{"decoders": ",".join(names), "out": str(default),
                                 "device": "cpu", "include_package": None, "quiet": True}]
    assert calls["create_app"] == [str(default)]
    assert calls["serve"] == [{"host": "127.0.0.1", "port": 8123}]

    for name in names:  # a finished run is served as it is
        (default / name / "checkpoint" / "best").mkdir(parents=True)
        (default / name / "checkpoint" / "best" / "config.json").write_text("{}")
    (default / "config.json").write_text("{}")
    (default / "report.md").write_text("done")
    assert run_is_finished(default, names)
    assert main(["serve"]) == 0
    assert len(calls["compare"]) == 1 and calls["create_app"][-1] == str(default)


def test_serve_errors_are_one_line(tiny_run, tmp_path, capsys):
    code = main(["serve", "--run", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "no config.json" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--run", str(tiny_run), "--decoders", "clipcap",
                     "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"cannot serve on 127.0.0.1:{port}" in err


# ------------------------------------------------------------------------------------------------
# a real browser against a real server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_server(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("no headless browser: install Debian's chromium + chromium-driver "
                    "(.ci/run does) to run the browser test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for_captions(driver, count: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(d):
        cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
        return len(cards) == count and all(
            c.get_attribute("data-state") == "done" and c.get_attribute("data-animating") == "false"
            for c in cards) and cards
    return WebDriverWait(driver, 60, poll_frequency=0.2).until(finished)


def test_browser_uploads_an_image_and_sees_every_caption(browser, live_server, app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    names = loaded_names(app)
    browser.get(live_server)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    sample = SAMPLES_DIR / list_samples()[0]
    browser.find_element(By.ID, "image-input").send_keys(str(sample))
    cards = wait_for_captions(browser, len(names))
    assert [c.get_attribute("data-decoder") for c in cards] == names
    for card in cards:
        assert card.find_element(By.CSS_SELECTOR, ".caption").text.strip()
        assert card.find_element(By.CSS_SELECTOR, ".ms").text.endswith("ms")
        steps = card.find_element(By.CSS_SELECTOR, ".steps").text
        if card.get_attribute("data-decoder") in iterative(app):
            count = int(steps.split()[0])
            assert len(card.find_elements(By.CSS_SELECTOR, ".trajectory-list li")) == count
    assert not browser.find_element(By.ID, "error").is_displayed()
    screenshot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # a bundled sample by click goes through the same upload path
    browser.find_elements(By.CSS_SELECTOR, ".sample")[-1].click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "preview-name").text == list_samples()[-1])
    wait_for_captions(browser, len(names))
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe

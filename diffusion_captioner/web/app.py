"""``dcap serve``: a web page and JSON API that caption your own image with every decoder of a run.

    create_app(run_dir)            Flask app over ``inference.load_run(run_dir)``
    GET  /                         the page (upload or pick a sample; captions side by side)
    GET  /api/decoders             what is loaded: name, class, kind, step options, trajectory
    POST /api/caption              multipart ``image`` [+ ``steps``, ``decoders`` = "a,b"]
                                   -> {decoder: {caption, ms, steps, kind, trajectory?}}

Uploads are decoded in memory (never written to disk), capped at :data:`MAX_UPLOAD_BYTES`
(413) and :data:`MAX_PIXELS` (400); one lock serialises the models, so concurrent requests are
safe; every error answers JSON (API) or a plain line (page), the traceback goes to the log only.
Caption requests go through :class:`~diffusion_captioner.web.limits.Admission`: at most
``workers`` run at once and ``queue`` wait (more answer 503), each within ``timeout_s`` (else 504).
:func:`serve` runs the app on waitress, a production WSGI server (pure Python, threads).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flask import Flask, Response, jsonify, render_template, request
from flask.wrappers import Request
from PIL import Image, ImageOps, UnidentifiedImageError
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

from diffusion_captioner.images import BadImageError, to_rgb
from diffusion_captioner.inference import LoadedRun, generate_captions, load_run
from diffusion_captioner.run_folder import RunFolder
from diffusion_captioner.web.limits import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKERS,
    Admission,
    Overloaded,
    TimedOut,
)
from registry import CaptionDecoder, DecoderKind, registered_name

logger = logging.getLogger(__name__)

#: Largest accepted upload (the file itself); bigger answers 413.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Slack for the multipart envelope around the file (boundaries, headers, small fields).
_ENVELOPE_BYTES = 64 * 1024
#: Largest accepted image area in pixels, checked from the header before decoding (a small PNG
#: can inflate to gigabytes).
MAX_PIXELS = 40_000_000
#: Largest ``steps`` a request may ask for.
MAX_STEPS = 1000

SAMPLES_DIR = Path(__file__).parent / "static" / "samples"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory (werkzeug spools big ones to disk)."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None,
                         content_length: int | None = None) -> io.BytesIO:
        return io.BytesIO()


@dataclass
class DecoderInfo:
    """One loaded decoder as ``GET /api/decoders`` shows it."""

    name: str
    cls: str
    registered_as: str | None
    kind: DecoderKind
    trajectory: bool
    default_steps: int | None
    step_options: list[int]
    options: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["class"] = data.pop("cls")
        return data


def describe_decoder(name: str, decoder: CaptionDecoder, options: dict[str, Any]) -> DecoderInfo:
    """Kind, trajectory, default step count and the step counts worth offering: read from the
    decoder's declared capabilities and its options (``options`` over the class defaults)."""
    capabilities = decoder.capabilities
    default = None
    if capabilities.step_option is not None:
        default = getattr(decoder.options(options), capabilities.step_option)
    steps = sorted(set(capabilities.step_sweep) | ({int(default)} if default is not None else set()))
    return DecoderInfo(name, f"{type(decoder).__module__}.{type(decoder).__qualname__}",
                       registered_name(type(decoder)), capabilities.kind, capabilities.trajectory,
                       int(default) if default is not None else None, steps, dict(options))


def token_steps(decoder: CaptionDecoder, caption: str) -> int | None:
    """Forward passes an autoregressive decoder spent on ``caption``: its tokens + the end token."""
    tokenizer = getattr(decoder, "tokenizer", None)
    if tokenizer is None:
        return None
    try:
        count = len(tokenizer(caption, add_special_tokens=False)["input_ids"]) + 1
    except Exception:  # a tokenizer of another shape: the count is a nicety, not worth a failure
        logger.debug("cannot count tokens of %r", caption, exc_info=True)
        return None
    limit = getattr(decoder, "max_length", None)
    return min(count, int(limit)) if isinstance(limit, int) else count


def decode_image(data: bytes) -> Image.Image:
    """Upload bytes -> RGB PIL image (EXIF orientation applied), entirely in memory.

    Raises :class:`BadImageError` with a one-line reason for anything that is not a readable
    image of at most :data:`MAX_PIXELS` pixels.
    """
    if not data:
        raise BadImageError("the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImageError(f"image too large: {width}x{height} pixels "
                                    f"(the limit is {MAX_PIXELS // 1_000_000} megapixels)")
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as error:  # a broken EXIF block must not lose the pixels
                logger.warning("upload: EXIF orientation ignored (%s: %s)",
                               type(error).__name__, error)
            return to_rgb(image)
    except BadImageError:
        raise
    except UnidentifiedImageError as error:
        raise BadImageError("not a readable image (unknown format; send a PNG, JPEG, GIF, WebP, "
                            "BMP or TIFF file)") from error
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise BadImageError(f"not a readable image ({reason})") from error


class CaptionService:
    """The loaded run behind the app: one lock around encoder and decoders."""

    def __init__(self, loaded: LoadedRun, run_name: str = "") -> None:
        self.loaded = loaded
        self.run_name = run_name
        self.lock = threading.Lock()
        self.infos = {name: describe_decoder(name, decoder, loaded.generate_options.get(name, {}))
                      for name, decoder in loaded.decoders.items()}

    @property
    def names(self) -> list[str]:
        return list(self.loaded.decoders)

    def select(self, names: list[str] | None) -> list[str]:
        """Requested decoder names (all when empty); unknown ones raise naming the loaded ones."""
        if not names:
            return self.names
        unknown = [name for name in names if name not in self.loaded.decoders]
        if unknown:
            raise ValueError(f"unknown decoder {', '.join(map(repr, unknown))}; "
                             f"loaded: {', '.join(self.names)}")
        return list(dict.fromkeys(names))

    def caption(self, image: Image.Image, names: list[str], steps: int | None = None,
                trajectory: bool = True) -> dict[str, dict[str, Any]]:
        """Encode ``image`` once and caption it with each decoder in ``names``, timed.

        ``steps`` overrides the step count of the iterative decoders only. ``ms`` is the
        decoder's generation time (the shared encoding is not in it).
        """
        answers: dict[str, dict[str, Any]] = {}
        with self.lock, torch.no_grad():
            pixels = self.loaded.encoder.preprocess(image).unsqueeze(0)  # (1, C, H, W)
            features = self.loaded.encoder.encode_images(pixels)  # (1, D)
            for name in names:
                decoder, info = self.loaded.decoders[name], self.infos[name]
                options = dict(self.loaded.generate_options.get(name, {}))
                step_option = decoder.capabilities.step_option
                if steps is not None and step_option is not None:
                    options[step_option] = steps
                want_trajectory = trajectory and info.trajectory
                generated, seconds = generate_captions(decoder, features,
                                                       trajectory=want_trajectory, **options)
                path = [str(c) for c in generated[0]] if want_trajectory else None
                caption = (path[-1] if path else "") if path is not None else str(generated[0])
                if path is not None:
                    count = len(path)
                elif step_option is not None:
                    count = options.get(step_option, info.default_steps)
                elif info.kind == "autoregressive":
                    count = token_steps(decoder, caption)
                else:
                    count = None
                answers[name] = {"caption": caption, "ms": round(1000 * seconds, 2),
                                 "steps": count, "kind": info.kind}
                if path is not None:
                    answers[name]["trajectory"] = path
        return answers


def parse_steps(value: str | None) -> int | None:
    if value is None or not value.strip() or value.strip().lower() == "default":
        return None
    try:
        steps = int(value)
    except ValueError as error:
        raise ValueError(f"steps must be a whole number, got {value!r}") from error
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    return steps


def parse_flag(value: str | None, default: bool = True) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def list_samples() -> list[str]:
    """File names of the bundled sample images (``static/samples``)."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)


def _error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status, **extra}), status


def create_app(run_dir: str | Path | None = None, *, loaded: LoadedRun | None = None,
               decoders: list[str] | None = None, device: str = "cpu",
               max_upload_bytes: int = MAX_UPLOAD_BYTES, workers: int = DEFAULT_WORKERS,
               queue: int = DEFAULT_QUEUE, timeout_s: float = DEFAULT_TIMEOUT_S) -> Flask:
    """The Flask app over a ``dcap compare`` run folder (every decoder, or ``decoders``).

    Pass ``loaded`` instead of ``run_dir`` to serve models already in memory. ``workers``,
    ``queue`` and ``timeout_s`` bound the caption requests (:class:`Admission`).
    """
    admission = Admission(workers, queue, timeout_s)  # bad limits fail before any model loads
    if loaded is None:
        if run_dir is None:
            raise ValueError("create_app needs a run folder (or loaded=LoadedRun)")
        loaded = load_run(run_dir, decoders, device=device)
    run_name = str(run_dir) if run_dir is not None else "in-memory"
    service = CaptionService(loaded, run_name)

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update(MAX_CONTENT_LENGTH=max_upload_bytes + _ENVELOPE_BYTES)
    app.json.sort_keys = False
    app.extensions["dcap"] = service
    app.extensions["dcap_admission"] = admission
    too_large = f"upload too large: the limit is {max_upload_bytes / 2**20:g} MB"

    @app.get("/")
    def index() -> str:
        return render_template("index.html", run_name=service.run_name, samples=list_samples(),
                               max_upload_bytes=max_upload_bytes,
                               max_upload_mb=f"{max_upload_bytes / 2**20:g}")

    @app.get("/api/decoders")
    def api_decoders() -> Response:
        return jsonify({
            "run": service.run_name,
            "decoders": [info.as_json() for info in service.infos.values()],
            "max_upload_bytes": max_upload_bytes,
            "max_steps": MAX_STEPS,
        })

    @app.post("/api/caption")
    def api_caption() -> Response | tuple[Response, int]:
        upload = request.files.get("image")
        if upload is None:
            return _error(400, "no image: send the file as the multipart field 'image'")
        data = upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise RequestEntityTooLarge()
        try:
            names = service.select([n.strip() for n in request.form.get("decoders", "").split(",")
                                    if n.strip()])
        except ValueError as error:
            return _error(400, str(error), available=service.names)
        try:
            steps = parse_steps(request.form.get("steps"))
            trajectory = parse_flag(request.form.get("trajectory"))
            image = decode_image(data)
        except ValueError as error:  # BadImageError is a ValueError
            return _error(400, str(error))
        started = time.perf_counter()
        try:
            answers = admission.run(lambda: service.caption(image, names, steps=steps,
                                                            trajectory=trajectory))
        except Overloaded as error:
            logger.info("caption request refused: %s", error)
            response, status = _error(503, str(error))
            response.headers["Retry-After"] = "1"
            return response, status
        except TimedOut as error:
            return _error(504, str(error))
        except ValueError as error:  # a decoder refusing an option (e.g. too many steps)
            logger.info("caption request refused: %s", error)
            return _error(400, " ".join(str(error).split()))
        logger.info("captioned a %dx%d image with %s in %.0f ms", image.width, image.height,
                    ", ".join(names), 1000 * (time.perf_counter() - started))
        return jsonify(answers)

    def wants_json() -> bool:
        return request.path.startswith("/api/") or request.accept_mimetypes.best == \
            "application/json"

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response | tuple[Any, int]:
        status = error.code or 500
        message = too_large if isinstance(error, RequestEntityTooLarge) else (
            f"{error.name}: {error.description}" if not isinstance(error, BadRequest)
            else f"bad request: {error.description}")
        if wants_json():
            return _error(status, message)
        return Response(message + "\n", status=status, mimetype="text/plain")

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response | tuple[Any, int]:
        logger.exception("internal error while serving %s %s", request.method, request.path)
        message = f"internal server error ({type(error).__name__}); the details are in the server log"
        if wants_json():
            return _error(500, message)
        return Response(message + "\n", status=500, mimetype="text/plain")

    return app


def run_is_finished(run: str | Path, names: list[str]) -> bool:
    """Whether ``run`` is a complete ``dcap compare`` folder for ``names`` (report written and
    every decoder's best checkpoint present)."""
    return RunFolder(Path(run)).is_finished(names)


#: Server threads beyond ``workers + queue`` (whose requests hold a thread while they run or
#: wait): they answer the page, ``/api/decoders`` and the 503s while the queue is full.
SPARE_THREADS = 4


def make_server(app: Flask, host: str = "127.0.0.1", port: int = 8000):
    """A waitress server for ``app``, bound and listening but not yet running (``.run()``).

    Threads: ``workers + queue + SPARE_THREADS`` of the app's :class:`Admission`, so every
    admitted request holds a thread and a request over the limit still reaches the app and is
    answered 503 at once. Waitress refuses bodies over twice the app's upload limit itself (the
    app answers 413 JSON for anything between) and keeps every body up to that in memory
    (``inbuf_overflow``; by default it spools bodies over 512 KB to a temporary file, and
    uploads must never touch the disk). A taken port is one ``ValueError`` line.
    """
    from waitress.server import create_server

    admission: Admission = app.extensions["dcap_admission"]
    limit = int(app.config.get("MAX_CONTENT_LENGTH") or MAX_UPLOAD_BYTES)
    try:
        return create_server(
            app, host=host, port=int(port), threads=admission.capacity + SPARE_THREADS,
            connection_limit=max(100, 2 * (admission.capacity + SPARE_THREADS)),
            max_request_body_size=2 * limit, inbuf_overflow=2 * limit + 1,
            channel_timeout=max(60, int(admission.timeout_s) + 30), ident="dcap")
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or "address unavailable"
        raise ValueError(f"cannot serve on {host}:{port}: {reason}") from error


def stop_server(server, thread: threading.Thread | None = None, timeout: float = 10.0) -> None:
    """Stop a waitress server whose ``run()`` is in ``thread``: its sockets are closed from
    inside its own loop (through its trigger, so no ``select`` sees a closed descriptor), the
    loop ends with nothing left to watch, then its worker threads are shut down."""
    from waitress.channel import HTTPChannel

    def close_all() -> None:  # runs in the server's loop thread
        for channel in list(server._map.values()):
            if isinstance(channel, HTTPChannel):
                channel.handle_close()
        server.close()  # the listening socket and the trigger

    server.trigger.pull_trigger(close_all)
    if thread is not None:
        thread.join(timeout)
    server.task_dispatcher.shutdown(timeout=timeout)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` with waitress until Ctrl+C (``dcap serve``)."""
    server = make_server(app, host, port)
    service: CaptionService = app.extensions["dcap"]
    admission: Admission = app.extensions["dcap_admission"]
    package_logger = logging.getLogger("diffusion_captioner.web")
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)
    logger.info("serving run %s (%s) on http://%s:%d/ with waitress: %d worker(s), queue %d, "
                "%g s per request; Ctrl+C stops", service.run_name, ", ".join(service.names),
                host, server.effective_port, admission.workers, admission.queue,
                admission.timeout_s)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        admission.close()
        server.close()

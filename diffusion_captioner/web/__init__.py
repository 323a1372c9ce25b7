"""The web demo behind ``dcap serve``: caption your own image with every decoder of a run and
watch the iterative decoders' captions form step by step (Flask on waitress, plain HTML + vanilla JS)."""

from diffusion_captioner.web.app import (
    MAX_UPLOAD_BYTES,
    CaptionService,
    create_app,
    decode_image,
    make_server,
    run_is_finished,
    serve,
    stop_server,
)

__all__ = ["MAX_UPLOAD_BYTES", "CaptionService", "create_app", "decode_image", "make_server",
           "run_is_finished", "serve", "stop_server"]

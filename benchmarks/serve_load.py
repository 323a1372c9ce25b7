"""Load test of ``dcap serve``: C concurrent clients on 127.0.0.1, each a bounded loop of requests.

Starts ``python -m diffusion_captioner serve --run RUN --port P --workers W --queue Q --timeout T``
in a subprocess (waitress), waits until ``/api/decoders`` answers, then runs ``--clients``
threads that each POST a bundled sample image to ``/api/caption`` ``--requests`` times (all the
run's decoders, trajectories on: what the page asks for). Every request must end as a 200 or a
503 (server busy): a request that hangs past ``--client-timeout`` seconds, a dropped connection
or any other status counts as lost. Afterwards the server must still answer a caption request.
Prints the counts and the latency (median, p95) of the 200s, the 503s and of every answer; writes a JSON::

    python benchmarks/serve_load.py --run runs/embedded-clipcap-diffusion-mnic-nearest \\
        --clients 32 --requests 10 --workers 2 --queue 16 --timeout 30 --out /tmp/serve_load.json

Exits non-zero when a request was lost or the server did not answer afterwards.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "diffusion_captioner" / "web" / "static" / "samples"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_caption(base: str, data: bytes, timeout: float) -> int:
    """POST one image as multipart ``image``; the HTTP status (raises on a hang or drop)."""
    boundary = "dcapbenchboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base}api/caption", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as error:
        json.loads(error.read())  # every error answer is JSON
        return error.code


def wait_until_up(base: str, server: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}api/decoders", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer {base}api/decoders within {limit_s:.0f} s")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `dcap compare` run folder")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=30.0, help="the server's --timeout")
    parser.add_argument("--client-timeout", type=float, default=120.0,
                        help="seconds after which a client calls its request hung")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "diffusion_captioner", "serve", "--run", args.run,
               "--port", str(port), "--workers", str(args.workers), "--queue", str(args.queue),
               "--timeout", str(args.timeout)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = [p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))]
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    try:
        wait_until_up(base, server, 120)

        def client(index: int) -> None:
            for request in range(args.requests):
                data = images[(index + request) % len(images)]
                began = time.perf_counter()
                try:
                    status: int | str = post_caption(base, data, args.client_timeout)
                except Exception as error:  # hung (socket timeout) or dropped
                    status = f"lost ({type(error).__name__})"
                with lock:
                    results.append((status, time.perf_counter() - began))

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.requests * args.client_timeout + 60)
        wall = time.perf_counter() - began
        stuck = sum(thread.is_alive() for thread in threads)
        after = post_caption(base, images[0], args.client_timeout)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    counts: dict[str, int] = {}
    for status, _ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    ok = [s for status, s in results if status == 200]
    busy = [s for status, s in results if status == 503]
    every = [s for _, s in results]
    lost = len(results) - counts.get("200", 0) - counts.get("503", 0) + stuck * args.requests

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    figures = {
        "command": " ".join(command[1:3]) + " " + " ".join(command[3:]),
        "clients": args.clients, "requests_per_client": args.requests,
        "workers": args.workers, "queue": args.queue, "timeout_s": args.timeout,
        "requests": len(results), "counts": counts, "lost_or_hung": lost,
        "stuck_clients": stuck, "answered_afterwards": after,
        "wall_s": round(wall, 1), "answers_per_s": round(len(results) / wall, 1),
        "latency_ms_200": {"median": ms(statistics.median(ok)) if ok else None,
                           "p95": ms(percentile(ok, 95))},
        "latency_ms_503": {"median": ms(statistics.median(busy)) if busy else None,
                           "p95": ms(percentile(busy, 95))},
        "latency_ms_all": {"median": ms(statistics.median(every)) if every else None,
                           "p95": ms(percentile(every, 95))},
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0 if lost == 0 and after == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

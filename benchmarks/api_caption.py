"""Captioning N image files through the Python API vs the CLI, side by side in one process.

Times, alternating the order each round (this shared machine drifts; compare the ratios):

- ``dcap caption`` end to end, in process (``cli.main``: load the run, caption, print);
- ``dc.load_run(run).caption(paths)`` end to end (load the run, caption);
- captioning only, the run loaded once: the CLI's ``caption_files`` vs the API's ``caption``;
- once each in a fresh interpreter (start-up and imports included): ``python -m
  diffusion_captioner caption`` vs ``python -c "import diffusion_captioner as dc; ..."``.

The images are the shapes data's test images written as PNG files::

    python benchmarks/api_caption.py [--run runs/embedded-clipcap-diffusion-mnic-nearest]
                                     [--images 100] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever package is installed


def write_images(folder: Path, count: int) -> list[Path]:
    """``count`` shapes test images as PNG files in ``folder``."""
    import registry

    data = registry.build("dataset", {"type": "shapes", "num_train": 0, "num_val": 0,
                                      "num_test": count})
    paths = []
    for record in data.records("test")[:count]:
        path = folder / f"{record.image_id}.png"
        data.load_image(record).save(path)
        paths.append(path)
    return paths


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs/embedded-clipcap-diffusion-mnic-nearest"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import logging

    import torch

    import diffusion_captioner as dc
    from diffusion_captioner.cli import main as cli_main

    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="dcap-api-bench-"))
    paths = write_images(folder, args.images)
    joined = ",".join(map(str, paths))

    def cli_end_to_end() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(["caption", "--run", args.run, "--images", joined]) == 0

    def api_end_to_end() -> None:
        dc.load_run(args.run).caption(paths)

    loaded = dc.load_run(args.run)
    by_path, _ = loaded.caption_files(paths)
    by_decoder = loaded.caption(paths)
    same = all([by_path[str(p)][n] for p in paths] == c for n, c in by_decoder.items())
    cases = {"end to end (load + caption)": (cli_end_to_end, api_end_to_end),
             "caption only (run loaded once)": (lambda: loaded.caption_files(paths),
                                                lambda: loaded.caption(paths))}
    for call in (cli_end_to_end, api_end_to_end):  # warm-up
        call()
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    for round_ in range(args.rounds):
        for name, (cli_call, api_call) in cases.items():
            order = [(0, cli_call), (1, api_call)]
            for slot, call in order if round_ % 2 == 0 else order[::-1]:
                times[name][slot].append(timed(call))

    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    snippet = ("import sys, diffusion_captioner as dc; "
               "dc.load_run(sys.argv[1]).caption(sys.argv[2].split(','))")
    commands = {"cli": [sys.executable, "-m", "diffusion_captioner", "caption", "--run", args.run,
                        "--images", joined],
                "api": [sys.executable, "-c", snippet, args.run, joined]}
    fresh = {}
    for name, command in commands.items():
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT,
                       env={**os.environ, **env_threads})
        fresh[name] = time.perf_counter() - started

    print(f"run {args.run}: {', '.join(loaded.names)}; {len(paths)} images, torch on "
          f"{args.threads} thread(s), medians of {args.rounds} alternating rounds; captions "
          f"{'identical' if same else 'DIFFER'} between the two paths")
    print(f"{'':<32} {'dcap caption':>12} {'dc API':>10} {'API / CLI':>10}")
    for name, (cli_times, api_times) in times.items():
        cli_s, api_s = statistics.median(cli_times), statistics.median(api_times)
        print(f"{name:<32} {cli_s:>10.3f} s {api_s:>8.3f} s {api_s / cli_s:>9.2f}x")
    print(f"{'fresh interpreter, once each':<32} {fresh['cli']:>10.3f} s {fresh['api']:>8.3f} s "
          f"{fresh['api'] / fresh['cli']:>9.2f}x")


if __name__ == "__main__":
    main()

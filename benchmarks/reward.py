"""Time the SCST CIDEr-D reward (eval.cider_reward) at the size of one training step.

Builds :class:`CiderDReward` over the shapes data's training captions (timed once), then scores
64 images x 5 samples -- the samples are real training captions of other images, so their
n-grams are realistic -- and prints the median of ``--repeats`` timings and whether the 50 ms
target for 64 x 5 is met::

    python benchmarks/reward.py [--images 64] [--samples 5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever package is installed

TARGET_MS = 50.0  # for 64 images x 5 samples


def main(images: int = 64, samples: int = 5, repeats: int = 20) -> int:
    from eval.cider_reward import CiderDReward
    from registry import build

    records = build("dataset", {"type": "shapes"}).records("train")
    references = {r.image_id: list(r.captions) for r in records}
    started = time.perf_counter()
    reward = CiderDReward(references)
    build_ms = (time.perf_counter() - started) * 1000.0
    # image b's samples: caption j of image b + 1 + j (another image's reference)
    keys = [records[b].image_id for b in range(images) for _ in range(samples)]
    captions = [records[(b + 1 + j) % len(records)].captions[j % len(records[0].captions)]
                for b in range(images) for j in range(samples)]
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        scores = reward(keys, captions)
        timings.append((time.perf_counter() - started) * 1000.0)
    step_ms = statistics.median(timings)
    print(f"construction over {reward.corpus_size} images "
          f"({sum(map(len, references.values()))} captions): {build_ms:.1f} ms")
    print(f"reward of {images} x {samples} samples: median {step_ms:.2f} ms of {repeats} "
          f"(min {min(timings):.2f}, max {max(timings):.2f}); mean reward {scores.mean():.3f}")
    if (images, samples) == (64, 5):
        verdict = "met" if step_ms < TARGET_MS else "NOT met"
        print(f"target {TARGET_MS:.0f} ms for 64 x 5: {verdict} ({step_ms:.2f} ms)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    sys.exit(main(**vars(parser.parse_args())))

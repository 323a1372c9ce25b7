"""Check that a run folder's checkpoints still caption its test split exactly as recorded.

Regenerates every decoder's test captions with its saved best checkpoint and default generation
options (from ``<decoder>/summary.json``) on the cached test features, and compares them with
``<decoder>/results_test.json``. Exit status 1 when any caption differs::

    python benchmarks/same_captions.py runs/embedded-clipcap-diffusion-mnic-nearest
"""

from __future__ import annotations

import sys


def main(run: str = "runs/embedded-clipcap-diffusion-mnic-nearest") -> int:
    from run_workspace import open_run

    from diffusion_captioner.inference import load_best

    opened = open_run(run)
    folder, config = opened.folder, opened.config
    test = opened.work.splits["test"]
    failed = False
    for name, plan in config.decoders.items():
        summary = folder.decoder(name).read_summary()
        decoder = load_best(folder, name, plan)
        recorded = folder.decoder(name).read_results()
        captions = decoder.generate(test.features, **summary["generate"])
        now = dict(zip(test.image_ids, captions, strict=True))
        differ = [i for i in recorded if recorded[i] != now[i]]
        print(f"{name}: {len(recorded) - len(differ)}/{len(recorded)} captions identical")
        failed = failed or bool(differ)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

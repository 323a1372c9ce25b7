"""The ``<decoder>+rerank`` rows of a finished run, from its saved samples (no new sampling)::

    python benchmarks/rerank.py runs/embedded-clipcap-diffusion-mnic-nearest

Prints each decoder's default CIDEr and its reranked CIDEr (``comparison.rerank_phase``: the
default caption and the diversity samples, reranked by CLIPScore with the run's encoder).
"""

from __future__ import annotations

import json
import sys


def main(run: str) -> int:
    from run_workspace import open_run

    from diffusion_captioner.comparison import clipscore_prompt, rerank_phase

    opened = open_run(run)
    folder, config, encoder = opened.folder, opened.config, opened.encoder
    test = opened.work.splits["test"]
    summaries = {name: folder.decoder(name).read_summary() for name in config.decoders}
    results = {name: folder.decoder(name).read_results() for name in config.decoders}
    rerank_phase(encoder, test, results, folder, summaries, clipscore_prompt(config.encoder))
    for name, summary in summaries.items():
        if summary.get("rerank"):
            print(json.dumps({"decoder": name,
                              "CIDEr": round(summary["test"]["default"]["scores"]["CIDEr"], 3),
                              "rerank": {k: (round(v["CIDEr"], 3) if k == "scores" else v)
                                         for k, v in summary["rerank"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

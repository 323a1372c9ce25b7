"""One SCST phase on a trained run's decoder, with a given ``train.scst`` block, scored on the
test split (CIDEr, paired bootstrap against the decoder's cross-entropy row): how the preset's
SCST settings were chosen.

    python benchmarks/scst_sweep.py RUN DECODER OUT '{"lr": 1e-3, "max_minutes": 3}'

RUN is a finished ``dcap compare`` folder (its DECODER row is the first phase); OUT gets the
``<decoder>-scst`` folder (resumable). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffusion_captioner.comparison import FirstPhase, Workspace, prepare_features, run_scst
from diffusion_captioner.run_folder import RunFolder
from diffusion_captioner.scst import SCST_SUFFIX
from eval.significance import paired_bootstrap, paired_scores
from registry import build


def main(run_dir: str, name: str, out_dir: str, block: str) -> None:
    torch.set_num_threads(1)
    run, out = RunFolder(Path(run_dir)), RunFolder(Path(out_dir))
    config = run.read_config()
    plan = config.decoders[name]
    plan = type(plan)(plan.decoder, plan.train, plan.generate, plan.distill, json.loads(block))
    dataset, encoder = build("dataset", config.dataset), build("encoder", config.encoder)
    work: Workspace = prepare_features(dataset, encoder, config.cache_dir, progress=False)
    summary = run.decoder(name).read_summary()
    first = FirstPhase(name, run.decoder(name).checkpoint, int(summary["train_steps"]),
                       float(summary["train_seconds"]))
    out.root.mkdir(parents=True, exist_ok=True)
    outcome = run_scst(name + SCST_SUFFIX, plan, work, out, first, progress=False)
    before = {int(k): v for k, v in run.decoder(name).read_per_image()["CIDEr"].items()}
    after = {int(k): v for k, v in outcome.per_image["CIDEr"].items()}
    test = paired_bootstrap(*paired_scores(before, after)).to_dict()
    print(json.dumps({"decoder": name, "block": json.loads(block),
                      "cider_before": summary["test"]["default"]["scores"]["CIDEr"],
                      "cider_after": outcome.summary["test"]["default"]["scores"]["CIDEr"],
                      "bootstrap": test, "scst_steps": outcome.summary["train_steps"],
                      "scst_seconds": outcome.summary["train_seconds"],
                      "best_val_cider": outcome.summary["scst"]["best_val_cider"]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])

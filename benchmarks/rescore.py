"""Score a run's trained decoder again with other generation options, without retraining.

For each JSON object of options (over the run's own), generates the test captions with the
decoder's best checkpoint and prints CIDEr overall and per test group, and the share of
captions naming one content phrase twice (``eval.caption_stats``)::

    python benchmarks/rescore.py runs/embedded-clipcap-diffusion-mnic-nearest diffusion \\
        '{}' '{"refine_schedule": "cosine"}' '{"refine_schedule": "threshold"}'

(``dcap compare`` does the same for a preset whose generation options differ, with the whole
report; this is the quick form for a sweep.)
"""

from __future__ import annotations

import json
import sys
import time


def main(run: str, name: str, *option_sets: str) -> int:
    from run_workspace import open_run

    from diffusion_captioner.inference import generate_captions, load_best
    from eval.caption_stats import repeats_a_content_phrase, words
    from eval.groups import record_groups, score_groups
    from eval.metrics import score_captions

    opened = open_run(run)
    folder, config, dataset = opened.folder, opened.config, opened.dataset
    test = opened.work.splits["test"]
    references = {r.image_id: list(r.captions) for r in test.records}
    groups = record_groups(dataset, test.records)
    decoder = load_best(folder, name, config.decoders[name])
    for text in option_sets or ("{}",):
        options = {**config.decoders[name].generate, **json.loads(text)}
        started = time.perf_counter()
        captions, _ = generate_captions(decoder, test.features, **options)
        seconds = time.perf_counter() - started
        results = dict(zip(test.image_ids, captions, strict=True))
        overall = score_captions(results, references, metrics=("CIDEr",)).scores["CIDEr"]
        by_group = {g: r.scores["CIDEr"] for g, r in
                    score_groups(results, references, groups, metrics=("CIDEr",)).items()}
        twice = {g: sum(repeats_a_content_phrase(words(results[i])) for i in results
                        if groups.get(i) == g) for g in by_group}
        print(json.dumps({"options": json.loads(text), "CIDEr": round(overall, 3),
                          "CIDEr_by_group": {g: round(v, 3) for g, v in by_group.items()},
                          "named_twice": twice, "generate_s": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""How well each decoder of a finished shapes run reads the objects' shapes given the rest of
the caption: the gap between a parallel and an autoregressive decoder, measured without decoding.

For every two-object test image the caption is the scene's canonical one ("a small red circle to
the left of a large blue square", left or top object first). Each decoder predicts its shape
words in one call, every other word given:

* ``diffusion``: the shape positions at the T state (t = T), every other position committed clean
  (t = 0), the input the refine sampler makes; the text slot holds the text prior's guess.
* ``mnic``: the shape positions [MASK]ed, one call.
* ``clipcap``: teacher forcing (its first shape sees the words before it only).

It prints, per decoder, the accuracy of the first and second shape words when both are predicted
together, the second when the first is given too, and how often the two predictions are one
shape named twice (the scene's two shapes are the same in ``same_true`` of them)::

    python benchmarks/shape_readout.py runs/embedded-clipcap-diffusion-mnic-nearest
"""

from __future__ import annotations

import json
import sys

SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "cross")


def _shape_positions(tokenizer, rows: list[list[int]]) -> list[list[int]]:
    return [[j for j, w in enumerate(row) if tokenizer.convert_ids_to_tokens(w) in SHAPE_WORDS]
            for row in rows]


def _summary(predicted: list[list[int]], gold: list[list[int]],
             second_given_first: list[int]) -> dict[str, float]:
    n = len(gold)
    pairs = list(zip(predicted, gold, strict=True))
    return {"first": sum(p[0] == g[0] for p, g in pairs) / n,
            "second": sum(p[1] == g[1] for p, g in pairs) / n,
            "second_given_first": sum(p == g[1] for p, g in
                                      zip(second_given_first, gold, strict=True)) / n,
            "same_shape_twice": sum(p[0] == p[1] for p in predicted) / n,
            "same_true": sum(g[0] == g[1] for g in gold) / n}


def diffusion_readout(decoder, features, captions) -> dict[str, float]:
    import torch

    tokenizer = decoder.tokenizer
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [decoder.end_token_id]
            for c in captions]
    ids = torch.full((len(rows), decoder.max_length), decoder.pad_token_id)  # (N, L)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    where = _shape_positions(tokenizer, rows)
    image = decoder._features(features)  # (N, D)
    text = decoder._prior(image) if decoder.text_prior is not None else None
    projected = decoder._projections(image, text, 0.0)

    def predict(hidden: list[list[int]]) -> torch.Tensor:
        masked = torch.zeros_like(ids, dtype=torch.bool)  # (N, L)
        for b, positions in enumerate(hidden):
            masked[b, positions] = True
        t = torch.where(masked, decoder.schedule.steps, 0)  # (N, L)
        noise = torch.randn(*ids.shape, decoder.word_embeddings.shape[1],
                            generator=torch.Generator().manual_seed(0))  # (N, L, E)
        x_t = decoder.t_state(decoder.embed(ids), t, noise)  # T state / clean words
        x0_hat = decoder._guided_x0(x_t, t, image, text, 0.0, None, projected)  # (N, L, E)
        return decoder.lm_logits(x0_hat).argmax(-1)  # (N, L)

    both = predict(where)
    second = predict([p[1:] for p in where])
    gold = [[int(ids[b, j]) for j in p] for b, p in enumerate(where)]
    return _summary([[int(both[b, j]) for j in p] for b, p in enumerate(where)], gold,
                    [int(second[b, p[1]]) for b, p in enumerate(where)])


def mnic_readout(decoder, features, captions) -> dict[str, float]:
    import torch

    ids, valid = decoder.encode_captions(captions)  # (N, T), (N, T)
    where = _shape_positions(decoder.tokenizer, ids.tolist())

    def predict(hidden: list[list[int]]) -> torch.Tensor:
        masked = torch.zeros_like(ids, dtype=torch.bool)
        for b, positions in enumerate(hidden):
            masked[b, positions] = True
        inputs = ids.masked_fill(masked, decoder.mask_token_id)  # (N, T)
        return decoder.token_logits(inputs, valid, features).argmax(-1)  # (N, T)

    both, second = predict(where), predict([p[1:] for p in where])
    gold = [[int(ids[b, j]) for j in p] for b, p in enumerate(where)]
    return _summary([[int(both[b, j]) for j in p] for b, p in enumerate(where)], gold,
                    [int(second[b, p[1]]) for b, p in enumerate(where)])


def clipcap_readout(decoder, features, captions) -> dict[str, float]:
    inputs = decoder.build_inputs({"features": features, "captions": captions})
    k = decoder.prefix_length
    hidden = decoder.lm.base_model(inputs_embeds=inputs["inputs_embeds"],
                                   attention_mask=inputs["attention_mask"]).last_hidden_state
    predicted = decoder.lm.get_output_embeddings()(hidden[:, k - 1:-1]).argmax(-1)  # (N, T)
    targets = inputs["labels"][:, k:]  # (N, T)
    where = [[j for j, w in enumerate(row) if w >= 0
              and decoder.tokenizer.convert_ids_to_tokens(w) in SHAPE_WORDS]
             for row in targets.tolist()]
    gold = [[int(targets[b, j]) for j in p] for b, p in enumerate(where)]
    # teacher forcing: the second shape always sees the first (and every word before it)
    return {**_summary([[int(predicted[b, j]) for j in p] for b, p in enumerate(where)], gold,
                       [int(predicted[b, p[1]]) for b, p in enumerate(where)]),
            "note": "first sees the words before it only; second sees the first"}


def main(run: str) -> int:
    import torch
    from run_workspace import open_run

    from diffusion_captioner.data.shapes import canonical_caption
    from diffusion_captioner.inference import load_best

    opened = open_run(run)
    folder, config, dataset = opened.folder, opened.config, opened.dataset
    test = opened.work.splits["test"]
    two = [i for i, r in enumerate(test.records) if len(dataset.scene(r)["objects"]) == 2]
    captions = [canonical_caption(dataset.scene(test.records[i])) for i in two]
    features = test.features[two]  # (N, D)
    readers = {"diffusion": diffusion_readout, "mnic": mnic_readout, "clipcap": clipcap_readout}
    for name, read in readers.items():
        if name not in config.decoders:
            continue
        decoder = load_best(folder, name, config.decoders[name])
        decoder.eval()
        with torch.no_grad():
            scores = read(decoder, features, captions)
        print(json.dumps({"decoder": name, "images": len(two),
                          **{k: round(v, 3) if isinstance(v, float) else v
                             for k, v in scores.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

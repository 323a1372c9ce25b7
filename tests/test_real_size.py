"""Defects a real-size run exposed: seeded random encoders, the rerun check on dataset and
encoder, every tokenizer folder form, text features only when used, every missing model named at
once, fixed-token timing, the real-size bench, and honest speed wording."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported
import pytest
import torch
from helpers import CAPTIONS, WORDS, tiny_decoder_config

from registry import ComponentError, build

ROOT = Path(__file__).resolve().parents[1]

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                            "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                          "layers": 1}}


# --------------------------------------------------------------------------------------------
# Random-weight encoders
# --------------------------------------------------------------------------------------------
def encode_in_a_new_process(config_dir: Path, seed: int) -> dict:
    script = textwrap.dedent(f"""
        import json, open_clip, torch
        open_clip.add_model_config({str(config_dir)!r})
        from diffusion_captioner.encoders import OpenClipEncoder
        torch.manual_seed(1234)
        before = torch.rand(1).item()
        torch.manual_seed(1234)
        encoder = OpenClipEncoder("tiny-test-clip", seed={seed})
        after = torch.rand(1).item()  # the global RNG is left as it was
        images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).view(2, 3, 32, 32)
        print(json.dumps({{"features": encoder.encode_images(images).tolist(),
                           "fingerprint": encoder.fingerprint, "rng_kept": before == after}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_random_init_encoder_is_the_same_network_in_every_process(tmp_path):
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP))
    first, second = (encode_in_a_new_process(tmp_path, 0) for _ in range(2))
    assert first["features"] == second["features"]
    assert first["fingerprint"] == second["fingerprint"] and first["rng_kept"]
    other = encode_in_a_new_process(tmp_path, 1)
    assert other["fingerprint"] != first["fingerprint"]  # another cache entry
    assert other["features"] != first["features"]


# --------------------------------------------------------------------------------------------
# Reruns into an existing --out
# --------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_a_rerun_with_another_dataset_fails_naming_what_differs(tmp_path, monkeypatch):
    from diffusion_captioner import comparison as compare_module

    def stop(*_, **__):
        raise Stop  # the first run gets as far as its features, as an interrupted run would

    monkeypatch.setattr(compare_module, "prepare_features", stop)
    small = {"type": "shapes", "num_train": 20, "num_val": 4, "num_test": 4}
    with pytest.raises(Stop):
        compare_module.compare(["mnic"], tmp_path / "run", dataset=small, progress=False)
    started = time.perf_counter()
    other = {**small, "seed": 7}
    with pytest.raises(ValueError, match=r"dataset\.config, dataset\.fingerprint differ") as error:
        compare_module.compare(["mnic"], tmp_path / "run", dataset=other, progress=False)
    assert "\n" not in str(error.value) and "--out" in str(error.value)
    assert time.perf_counter() - started < 30
    with pytest.raises(Stop):  # the same inputs resume
        compare_module.compare(["mnic"], tmp_path / "run", dataset=small, progress=False)


# --------------------------------------------------------------------------------------------
# Tokenizer folders
# --------------------------------------------------------------------------------------------
def tokenizer_folder(tmp_path: Path, form: str) -> Path:
    from diffusion_captioner.tokenization import build_word_tokenizer

    folder = tmp_path / form
    folder.mkdir()
    if form == "saved":
        build_word_tokenizer(WORDS).save_pretrained(str(folder))
    elif form == "wordpiece-vocab-txt":  # a BERT folder as some packages ship it
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        (folder / "vocab.txt").write_text("\n".join(specials + list(WORDS)) + "\n")
    elif form == "gpt2-bpe":  # vocab.json + merges.txt, nothing else
        letters = sorted({c for w in WORDS for c in w} | {"\u0120"})
        vocab = {token: i for i, token in enumerate(["<|endoftext|>", *letters])}
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.mark.parametrize("form", ["saved", "wordpiece-vocab-txt", "gpt2-bpe"])
@pytest.mark.parametrize("name", ["clipcap", "mnic", "diffusion"])
def test_every_tokenizer_folder_form_loads_for_every_decoder(tmp_path, name, form):
    from diffusion_captioner.tokenization import read_tokenizer

    folder = tokenizer_folder(tmp_path, form)
    if form != "gpt2-bpe":  # the whole vocabulary, and a caption round-trips without [UNK]
        tokenizer = read_tokenizer(folder)
        assert len(tokenizer) == 5 + len(WORDS)
        ids = tokenizer(CAPTIONS[1], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids).replace(" .", ".") == CAPTIONS[1].replace(" .", ".")
    config = tiny_decoder_config(name, 8, tmp_path)
    config["tokenizer"] = str(folder)
    torch.manual_seed(0)
    decoder = build("decoder", config, feature_dim=8)
    parts = decoder.loss({"features": torch.randn(2, 8), "captions": list(CAPTIONS[:2])})
    assert torch.isfinite(parts["loss"])
    assert len(decoder.generate(torch.randn(2, 8))) == 2


def test_an_unreadable_tokenizer_folder_fails_in_one_whole_line(tmp_path):
    from diffusion_captioner.tokenization import read_tokenizer

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises((ComponentError, OSError, ValueError)) as error:
        read_tokenizer(folder)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# What a run loads
# --------------------------------------------------------------------------------------------
def test_text_features_only_when_the_config_uses_them():
    from registry import resolve

    diffusion = resolve("decoder", "diffusion")
    assert diffusion.uses_text_features({"text_condition": True})
    assert diffusion.uses_text_features({})  # the constructor's default
    assert not diffusion.uses_text_features({"text_condition": False})
    assert not resolve("decoder", "clipcap").uses_text_features({})


def test_every_missing_model_is_named_at_once(monkeypatch):
    from diffusion_captioner import hub
    from registry import resolve

    monkeypatch.setattr(hub, "hf_cached", lambda *_: False)
    requirements = (resolve("decoder", "clipcap").hub_models({"lm": "gpt2"})
                    + resolve("decoder", "mnic").hub_models({"lm_pretrained": False,
                                                              "tokenizer": "org/words"}))
    assert requirements == [("gpt2", "tokenizer"), ("gpt2", "model"), ("org/words", "tokenizer")]
    started = time.perf_counter()
    with pytest.raises(ComponentError) as error:
        hub.check_available(requirements, [("ViT-B-32", "openai")])
    message = str(error.value)
    assert time.perf_counter() - started < 10 and "\n" not in message
    for name in ("tokenizer 'gpt2'", "model 'gpt2'", "tokenizer 'org/words'", "ViT-B-32:openai"):
        assert name in message
    hub.check_available([("embedded:shapes_words", "tokenizer")])  # local: nothing missing


# --------------------------------------------------------------------------------------------
# Timing at real size
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 7])
def test_fixed_tokens_makes_exactly_n_lm_calls(tmp_path, tokens):
    decoder = build("decoder", tiny_decoder_config("clipcap", 8, tmp_path),
                    feature_dim=8)
    calls = []
    handle = decoder.lm.base_model.register_forward_hook(lambda *_: calls.append(1))
    decoder.generate(torch.randn(3, 8), fixed_tokens=tokens)
    handle.remove()
    assert len(calls) == tokens
    with pytest.raises(ValueError, match="num_beams=1"):
        decoder.generate(torch.randn(1, 8), fixed_tokens=3, num_beams=2)


def test_bench_preset_times_untrained_decoders_with_stand_in_tokenizers(tmp_path):
    from diffusion_captioner.bench_preset import bench_preset, random_init_config

    speed = bench_preset("embedded", ["clipcap", "diffusion"], repeats=1, warmup=0, images=1,
                         batch_sizes=(1,), steps=(1, 2), tokens=3)
    options = {n: [r["options"] for r in rows] for n, rows in speed["decoders"].items()}
    assert options["clipcap"] == [{"num_beams": 1, "fixed_tokens": 3}]
    assert [o["steps"] for o in options["diffusion"]] == [5, 1, 2]
    assert "fixed_tokens" not in options["diffusion"][0]
    assert speed["contrast"]["diffusion"]["latency_ratio"] > 0
    # a hub tokenizer that is not at hand: a stand-in of the architecture's vocabulary size
    config = random_init_config("mnic", {"type": "mnic", "lm": "bert-base-uncased"}, tmp_path)
    from transformers import AutoTokenizer

    assert config["lm_pretrained"] is False
    assert len(AutoTokenizer.from_pretrained(config["tokenizer"])) == 30522


def test_speed_wording_says_noise_rather_than_a_negative_figure():
    from diffusion_captioner.report import _headline
    from eval.speed import describe_step_costs

    rows = [{"options": {"steps": k}, "batch": 1, "ms_per_caption": ms}
            for k, ms in ((1, 1.0), (5, 9.0), (10, 20.0))]
    line = describe_step_costs({"diffusion": rows})[0]
    assert "below the timing noise" in line and "-" in line.split("fit gives")[1][:3]
    flat = [{"options": {"steps": k}, "batch": 1, "ms_per_caption": 5.0 - 0.01 * k}
            for k in (1, 5, 10)]
    assert "no per-step cost resolved" in describe_step_costs({"mnic": flat})[0]
    zero = {"difference": 0.0, "low": -0.0, "high": 0.0, "significant": False, "images": 1}
    metrics = {"decoders": {"clipcap": {}, "diffusion": {}},
               "significance": {"diffusion": {"CIDEr": zero, "Bleu_4": zero}}}
    headline = _headline(metrics)[0]
    assert "no difference to test" in headline and "0.000" not in headline


def test_help_has_no_fire_info_line():
    out = subprocess.run([sys.executable, "-m", "diffusion_captioner", "compare", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    text = (out.stdout + out.stderr).lstrip()
    assert text.startswith("NAME") and "INFO: Showing help" not in text


def test_the_last_step_is_logged_and_short_curves_show(tmp_path):
    import jsonlines

    from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
    from eval.plots import _plain_numbers, plot_training_curves

    decoder = build("decoder", tiny_decoder_config("clipcap", 8, tmp_path),
                    feature_dim=8)
    pairs = CaptionPairs(torch.randn(4, 8), [(c,) for c in CAPTIONS])
    config = TrainConfig.from_dict({"batch_size": 2, "max_steps": 3, "log_every": 25})
    Trainer(decoder, pairs, None, config, tmp_path / "run", progress=False).fit()
    with jsonlines.open(tmp_path / "run" / "train_log.jsonl") as log:
        rows = list(log)
    assert [r["step"] for r in rows if "loss" in r] == [1, 3]
    assert plot_training_curves({"clipcap": rows}, tmp_path / "curves.png").is_file()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axis = plt.subplots()
    axis.plot([1, 2], [0.5, 2000])
    axis.set_yscale("log")
    _plain_numbers(axis)  # four decades: minor ticks unlabelled, so labels cannot overlap
    assert isinstance(axis.yaxis.get_minor_formatter(), NullFormatter)
    plt.close(figure)


def test_a_time_budget_stops_the_speed_phase_early():
    from diffusion_captioner.analysis import bench_decoders
    from registry import CaptionDecoder

    class Slow(CaptionDecoder):
        def generate_batch(self, features, options):
            time.sleep(0.02)
            return ["a"] * len(features)

    speed = bench_decoders({"slow": Slow(), "other": Slow()}, {}, torch.randn(4, 3),
                           repeats=1, warmup=0, batch_sizes=(1, 2, 4), images=1, max_seconds=0)
    assert [len(rows) for rows in speed["decoders"].values()] == [1, 1]  # the first row only
    assert speed["cut_by_budget"] == ["slow", "other"]

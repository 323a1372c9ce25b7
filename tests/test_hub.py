"""Pretrained models by name or path, offline: tiny models saved in hub format load through the same
code as a hub name; real tokenizer files load; an unreachable name fails fast with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import block_network, tiny_word_tokenizer_dir

from diffusion_captioner import hub
from registry import ComponentError, build

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}


@pytest.fixture
def online_but_unreachable(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset, an empty HF cache, and every socket connection refused."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    empty_cache(monkeypatch, tmp_path / "hf-cache")
    monkeypatch.setattr(hub, "_probed", {})
    block_network(monkeypatch)


def empty_cache(monkeypatch, folder: Path) -> Path:
    from huggingface_hub import constants

    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


def save_tiny_gpt2(folder: Path, shared: Path | None) -> Path:
    """A tiny GPT-2 in hub format (config.json, model.safetensors, tokenizer files)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from diffusion_captioner.tokenization import load_tokenizer

    bpe = shared / "tokenizers" / "gpt2" if shared is not None else None
    source = bpe if bpe is not None and bpe.is_dir() else tiny_word_tokenizer_dir(folder.parent)
    tokenizer = load_tokenizer(str(source))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY_GPT2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def clipcap(lm: str, **overrides):
    return build("decoder", {"type": "clipcap", "feature_dim": 8, "lm": lm, "lm_pretrained": True,
                             "prefix_length": 2, "max_length": 8, **overrides})


def shared_or_none() -> Path | None:
    from conftest import SHARED

    return SHARED if SHARED.is_dir() else None


def test_local_directory_loads_like_a_hub_name_with_the_network_blocked(tmp_path, monkeypatch):
    block_network(monkeypatch)
    folder = save_tiny_gpt2(tmp_path / "tiny-gpt2", shared_or_none())
    decoder = clipcap(str(folder))  # lm and tokenizer both from the directory
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(decoder.lm.transformer.h[0].attn.c_attn.weight,
                       saved["transformer.h.0.attn.c_attn.weight"])
    assert len(decoder.generate(torch.randn(2, 8), max_length=3)) == 2


def test_cached_hub_name_loads_offline_when_the_hub_is_unreachable(tmp_path, monkeypatch,
                                                                   online_but_unreachable):
    """A name found in the HF cache loads from it at once: no ETag request waits on the network."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-gpt2"
    save_tiny_gpt2(repo / "snapshots" / commit, shared_or_none())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    started = time.monotonic()
    decoder = clipcap("tiny-org/tiny-gpt2")
    assert time.monotonic() - started < 10
    assert decoder.lm.config.n_layer == 1
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False  # offline mode was only forced for the load


def test_real_gpt2_and_bert_tokenizer_files_load(shared_dir, tmp_path):
    from transformers import BertTokenizerFast

    from diffusion_captioner.tokenization import load_tokenizer

    gpt2 = load_tokenizer(str(shared_dir / "tokenizers" / "gpt2"))
    text = "A man riding a wave on top of a surfboard."
    assert len(gpt2) == 50257 and gpt2.decode(gpt2(text)["input_ids"]) == text
    assert gpt2.pad_token == gpt2.eos_token == "<|endoftext|>"
    bert_dir = tmp_path / "bert"
    # transformers 5: BertTokenizerFast(vocab_file=...) ignores the file; from_pretrained reads it
    BertTokenizerFast.from_pretrained(str(shared_dir / "tokenizers" / "bert-base-uncased")
                                      ).save_pretrained(bert_dir)
    from transformers import AutoTokenizer

    with hub.hf_access(str(bert_dir), "tokenizer"):  # BERT has no eos: decoders add [SEP] themselves
        bert = AutoTokenizer.from_pretrained(str(bert_dir))
    assert len(bert) == 30522
    assert bert.tokenize("A surfboard!") == ["a", "surf", "##board", "!"]


def assert_fast_one_line(call, *needles: str) -> str:
    started = time.monotonic()
    with pytest.raises(ComponentError) as error:
        call()
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_uncached_name_fails_fast_with_hf_hub_offline(tmp_path, monkeypatch):
    cache = empty_cache(monkeypatch, tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    block_network(monkeypatch)
    words = str(tiny_word_tokenizer_dir(tmp_path))
    assert_fast_one_line(lambda: clipcap("no-such-org/no-such-gpt", tokenizer=words),
                         "causal LM 'no-such-org/no-such-gpt'", str(cache), "HF_HUB_OFFLINE=1",
                         "hf download no-such-org/no-such-gpt", "pass that directory")
    assert_fast_one_line(lambda: clipcap("gpt2"), "tokenizer 'gpt2'",
                         "hf download gpt2")


def test_uncached_name_fails_fast_when_the_network_is_unreachable(tmp_path, online_but_unreachable):
    words = str(tiny_word_tokenizer_dir(tmp_path))
    message = assert_fast_one_line(lambda: clipcap("gpt2", tokenizer=words), "causal LM 'gpt2'",
                                   "huggingface.co:443 cannot be reached", "hf download gpt2")
    assert "HF_HUB_OFFLINE" not in message
    # random weights from the built-in gpt2 config need no hub file at all
    build("decoder", {"type": "clipcap", "feature_dim": 8, "lm": "gpt2", "lm_pretrained": False,
                      "tokenizer": words, "lm_config": TINY_GPT2, "prefix_length": 2, "max_length": 8})


@pytest.mark.parametrize("offline", [True, False])
def test_open_clip_pretrained_tag_fails_fast(tmp_path, monkeypatch, offline):
    from diffusion_captioner.encoders import OpenClipEncoder

    if offline:
        empty_cache(monkeypatch, tmp_path / "hf-cache")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        block_network(monkeypatch)
    else:
        monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip too
        from huggingface_hub import constants

        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        empty_cache(monkeypatch, tmp_path / "hf-cache")
        monkeypatch.setattr(hub, "_probed", {})
        block_network(monkeypatch)
    assert_fast_one_line(lambda: OpenClipEncoder("ViT-B-32", pretrained="openai"),
                         "open_clip weights 'ViT-B-32:openai'", str(tmp_path / "hf-cache"),
                         "hf download timm/vit_base_patch32_clip_224.openai",
                         "--encoder ViT-B-32:/path/")
    # an unknown name still gets open_clip's own one-line error
    with pytest.raises(ComponentError, match="could not be loaded"):
        OpenClipEncoder("Not-A-Model-9000", pretrained="openai")


def test_probe_never_hangs(monkeypatch):
    """A connection that never answers (or a stuck DNS lookup) counts as unreachable in time."""
    monkeypatch.setattr(hub, "_probed", {})
    def stuck(*args, **kwargs):
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", stuck)
    started = time.monotonic()
    assert hub.reachable("https://hub.invalid", timeout=0.3) is False
    assert time.monotonic() - started < 2


def test_probe_goes_through_the_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub._probe_target("https://huggingface.co") == ("proxy.internal", 3128)
    monkeypatch.setenv("NO_PROXY", ".co")
    assert hub._probe_target("https://huggingface.co") == ("huggingface.co", 443)


def test_real_process_without_hf_hub_offline_fails_fast(tmp_path):
    """End to end in a fresh interpreter: HF_HUB_OFFLINE unset, the endpoint a closed local port."""
    script = tmp_path / "unreachable.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path[:0] = [{str(ROOT)!r}]
        from registry import ComponentError, build
        from diffusion_captioner.encoders import OpenClipEncoder
        out = {{}}
        for name, call in [
            ("lm", lambda: build("decoder", {{"type": "clipcap", "feature_dim": 8, "lm": "gpt2"}})),
            ("clip", lambda: OpenClipEncoder("ViT-B-32", pretrained="openai")),
        ]:
            started = time.monotonic()
            try:
                call()
                out[name] = ["loaded", 0]
            except ComponentError as error:
                out[name] = [str(error), time.monotonic() - started]
        print(json.dumps(out))
        """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               HOME=str(tmp_path), OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=120, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    for name, (message, seconds) in out.items():
        assert seconds < 10 and "127.0.0.1:9 cannot be reached" in message, (name, message)
        assert "\n" not in message


def test_mnic_with_an_uncached_hub_name_fails_fast_offline(monkeypatch, tmp_path):
    """The masked-LM baseline goes through the same fast-fail guard as clipcap."""
    import time

    from baselines.mnic import MNICDecoder
    from registry import ComponentError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    started = time.perf_counter()
    with pytest.raises(ComponentError, match="no-such-org/no-such-bert") as error:
        MNICDecoder(feature_dim=8, lm="no-such-org/no-such-bert")
    assert "\n" not in str(error.value)
    assert time.perf_counter() - started < 10

"""Shareable runs: ``dcap export`` writes a self-contained copy of a ``compare`` run, and
``hf-hub:org/name`` loads one from the Hugging Face hub.

An export is read by ``dcap caption``, ``dcap serve`` and ``dc.load_run`` exactly as they read a
run folder (the same ``config.json`` and ``<decoder>/checkpoint/best`` layout). Layout::

    DIR/README.md                   model card: YAML front matter (library_name, tags, datasets,
                                    license, metrics, model-index) + metric table, command, data
    DIR/export.json                 what the folder is: the source run, its identity, the encoder
    DIR/config.json                 the run's config; a shipped encoder's spec points into DIR
    DIR/inputs.json, metrics.json   the run's inputs and metrics (as ``compare`` wrote them)
    DIR/report.md                   the run's report, with the plots and example images it links
    DIR/encoder/                    the encoder's files when no name can fetch them (the embedded
                                    shapes CLIP, a ``local-dir:`` or a local checkpoint file);
                                    hub names, pretrained tags and seeded random weights are
                                    referenced by their spec
    DIR/<decoder>/checkpoint/best/  each decoder's best checkpoint (``save_pretrained`` layout)
    DIR/<decoder>/summary.json      its training and test summary

The folder is written into a temporary sibling and moved into place, so a failed export never
leaves half a folder. A non-empty target is replaced only when it is an export of the same run
(same ``config.json`` content); anything else is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffusion_captioner.run_folder import RunFolder
from registry import ComponentError

logger = logging.getLogger(__name__)

MANIFEST = "export.json"
FORMAT = "diffusion_captioner-export"
FORMAT_VERSION = 1
HF_PREFIX = "hf-hub:"
ENCODER_DIR = "encoder"
#: Files of the run folder an export carries besides the checkpoints (when they exist).
RUN_FILES = ("inputs.json", "metrics.json", "report.md")  # RunFolder's inputs, metrics, report
#: The metrics of the model card, pycocoevalcap's names then the CLIPScores, and their labels.
CARD_METRICS = {"Bleu_1": "BLEU-1", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L",
                "CIDEr": "CIDEr", "SPICE": "SPICE", "CLIPScore": "CLIP-S",
                "RefCLIPScore": "RefCLIP-S"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExportError(ValueError):
    """An export that cannot be written; the message is one line naming the folder and what to do."""


# --------------------------------------------------------------------------------------------
# Reading: an export or a hub name is a run folder
# --------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """``folder/export.json`` when ``folder`` is an export written by :func:`export_run`, else None."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def check_repo_id(repo: str, flag: str) -> str:
    """``org/name`` or a one-line error naming ``flag``."""
    if not _REPO_ID.match(repo):
        raise ValueError(f"{flag}: {repo!r} is not a hub repository id; write it as org/name")
    return repo


def resolve_run(run: str | Path) -> Path:
    """A run folder as a local path: ``hf-hub:org/name`` is downloaded (or read from the HF cache)
    through the hub guard :func:`hub.hf_access`, which fails at once, in one line naming the repo,
    when it is neither cached nor reachable; any other value is a local folder."""
    text = str(run)
    if not text.startswith(HF_PREFIX):
        return Path(run)
    repo = check_repo_id(text[len(HF_PREFIX):], "--run")
    from huggingface_hub import constants, snapshot_download

    from diffusion_captioner.hub import hf_access

    with hf_access(repo, "exported run", local_hint="pass the exported folder itself: --run DIR"):
        folder = snapshot_download(repo_id=repo, local_files_only=bool(constants.HF_HUB_OFFLINE))
    logger.info("run %s: files in %s", text, folder)
    return Path(folder)


def encoder_config_of(run: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The encoder spec of a run's ``config.json``; in an export, a shipped encoder's relative
    ``local-dir:encoder`` (or ``pretrained: encoder/FILE``) is taken inside the export folder."""
    spec = dict(config["encoder"])
    manifest = read_manifest(run)
    if manifest is None or not (manifest.get("encoder") or {}).get("shipped"):
        return spec
    model = str(spec.get("model", ""))
    if model.startswith("local-dir:") and not Path(model[len("local-dir:"):]).is_absolute():
        spec["model"] = f"local-dir:{Path(run) / model[len('local-dir:'):]}"
    pretrained = spec.get("pretrained")
    if pretrained and not Path(str(pretrained)).is_absolute():
        spec["pretrained"] = str(Path(run) / str(pretrained))
    return spec


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def run_identity(run: Path) -> dict[str, str]:
    """``{"id", "name"}`` of a run: the sha256 of its ``config.json`` and its folder name. An
    export keeps the identity of the run it was made from."""
    manifest = read_manifest(run)
    if manifest is not None:
        return dict(manifest["run"])
    digest = hashlib.sha256((run / "config.json").read_bytes()).hexdigest()[:16]
    return {"id": digest, "name": run.resolve().name}


def check_target(target: Path, identity: dict[str, str]) -> None:
    """Refuse a ``--to`` folder that is non-empty and not an export of the same run."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportError(f"--to {target}: is a file, not a folder; pass a new or empty folder")
    if not any(target.iterdir()):
        return
    manifest = read_manifest(target)
    if manifest is None:
        raise ExportError(f"--to {target}: the folder is not empty and is not an export (no "
                          f"{MANIFEST}); pass a new or empty folder, or delete {target} first")
    if manifest["run"].get("id") != identity["id"]:
        raise ExportError(f"--to {target}: holds an export of another run "
                          f"({manifest['run'].get('name')}); pass a new or empty folder, or "
                          f"delete {target} first")


def ship_encoder(spec: dict[str, Any], out: Path) -> tuple[dict[str, Any], bool]:
    """Copy the encoder's files into ``out/encoder`` when no name can fetch them elsewhere; returns
    the spec the export records (relative to ``out``) and whether the files were shipped."""
    from diffusion_captioner.encoders import EMBEDDED_PREFIX, embedded_asset

    model, pretrained = str(spec.get("model", "")), spec.get("pretrained")
    source: Path | None = None
    if model.startswith(EMBEDDED_PREFIX):
        source = embedded_asset(model[len(EMBEDDED_PREFIX):])
    elif model.startswith("local-dir:"):
        source = Path(model[len("local-dir:"):]).expanduser()
    if source is not None:
        if not source.is_dir():
            raise FileNotFoundError(f"encoder {model}: folder {source} not found; export from "
                                    "where the run's encoder folder is")
        shutil.copytree(source, out / ENCODER_DIR)
        return {**spec, "model": f"local-dir:{ENCODER_DIR}"}, True
    if pretrained and Path(str(pretrained)).expanduser().is_file():
        checkpoint = Path(str(pretrained)).expanduser()
        (out / ENCODER_DIR).mkdir()
        shutil.copy2(checkpoint, out / ENCODER_DIR / checkpoint.name)
        return {**spec, "pretrained": f"{ENCODER_DIR}/{checkpoint.name}"}, True
    return dict(spec), False  # a hub name, a pretrained tag or seeded random weights


def _linked_files(report: str) -> list[str]:
    """Relative files a markdown report links (``![..](quality.png)``, ``examples/1.png``)."""
    links = re.findall(r"\]\(([^)\s]+)\)", report)
    return [link for link in dict.fromkeys(links)
            if "://" not in link and not link.startswith(("/", "#")) and ".." not in link]


def export_run(run: str | Path, to: str | Path, push_to_hub: str | None = None) -> Path:
    """Write the self-contained export of ``run`` into ``to`` (see the module docstring);
    with ``push_to_hub="org/name"`` upload it too. Returns ``to``.

    The hub is checked before anything is written, so an offline ``push_to_hub`` fails at once.
    """
    from diffusion_captioner.checkpoint import _default_dir_mode, _replace_directory

    if push_to_hub:
        check_repo_id(push_to_hub, "--push-to-hub")
        require_hub(push_to_hub)
    run, target = resolve_run(run), Path(to).expanduser()
    folder = RunFolder(run)
    if not folder.config.is_file():
        raise FileNotFoundError(f"--run {run}: no config.json; is it a `dcap compare` --out?")
    config = json.loads(folder.config.read_text())
    names = list(config["decoders"])
    for name in names:
        if not folder.decoder(name).has_checkpoint():
            raise FileNotFoundError(f"decoder {name}: no checkpoint at "
                                    f"{folder.decoder(name).checkpoint}; rerun the compare "
                                    "command to finish training, then export")
    identity = run_identity(run)
    check_target(target, identity)
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        staging.chmod(_default_dir_mode())
        _write_export(run, staging, config, names, identity, push_to_hub, target.name)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported run %s (%s) to %s", run, ", ".join(names), target)
    if push_to_hub:
        push(target, push_to_hub)
    return target


def _write_export(run: Path, out: Path, config: dict[str, Any], names: list[str],
                  identity: dict[str, str], repo: str | None, folder_name: str) -> None:
    source_manifest = read_manifest(run)
    original_encoder = (source_manifest or {}).get("encoder", {}).get("original") or config["encoder"]
    if source_manifest is not None and source_manifest["encoder"].get("shipped"):
        shutil.copytree(run / ENCODER_DIR, out / ENCODER_DIR)
        encoder, shipped = dict(config["encoder"]), True
    else:
        encoder, shipped = ship_encoder(config["encoder"], out)
    source, exported = RunFolder(run), RunFolder(out)
    exported.config.write_text(json.dumps({**config, "encoder": encoder}, indent=2))
    for name in names:
        shutil.copytree(source.decoder(name).checkpoint, exported.decoder(name).checkpoint)
        if source.decoder(name).summary.is_file():
            shutil.copy2(source.decoder(name).summary, exported.decoder(name).summary)
    for file in RUN_FILES:
        if (run / file).is_file():
            shutil.copy2(run / file, out / file)
    if source.report.is_file():
        for link in _linked_files(source.report.read_text()):
            if (run / link).is_file():
                (out / link).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / link, out / link)
    metrics = source.read_metrics() if source.metrics.is_file() else None
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "run": identity, "decoders": names,
        "encoder": {"original": original_encoder, "shipped": shipped},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    where = f"{HF_PREFIX}{repo}" if repo else None
    (out / "README.md").write_text(model_card(identity["name"], config, metrics, original_encoder,
                                              shipped, where or f"path/to/{folder_name}"))


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion_captioner")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "unknown"


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------
def dataset_names(dataset: dict[str, Any]) -> list[str]:
    """Short names of a dataset config, for the card's ``datasets`` field."""
    kind = str(dataset.get("type", "unknown"))
    if kind == "combined":
        return [n for member in dataset.get("datasets", []) for n in dataset_names(member)]
    if kind == "karpathy" and dataset.get("annotations"):
        stem = Path(str(dataset["annotations"])).stem
        return [stem.removeprefix("dataset_").replace("coco", "coco-karpathy")]
    if kind == "jsonl" and dataset.get("path"):
        return [f"jsonl:{Path(str(dataset['path'])).stem}"]
    return [kind]


def card_licence(dataset: dict[str, Any]) -> tuple[str, str]:
    """(licence id, one sentence): the toolkit's MIT for the generated ``shapes`` data, else
    ``other``: the weights follow the data's and the pretrained models' terms."""
    if dataset_names(dataset) == ["shapes"]:
        return "mit", ("MIT, the licence of diffusion_captioner: the `shapes` data is rendered by "
                       "the toolkit itself and the embedded encoder was trained by it.")
    return "other", ("The weights were trained on the data above with the pretrained models named "
                     "in the configuration; their licences and terms of use apply (check each "
                     "before sharing or using this model).")


def _scores(summary: dict[str, Any]) -> dict[str, float]:
    scores = dict(summary.get("test", {}).get("default", {}).get("scores", {}))
    scores.update(summary.get("clip_scores") or {})
    return {k: float(v) for k, v in scores.items()
            if k in CARD_METRICS and isinstance(v, int | float) and v == v}  # NaN dropped


def model_card(run_name: str, config: dict[str, Any], metrics: dict[str, Any] | None,
               encoder: dict[str, Any], shipped: bool, where: str | None = None) -> str:
    """The export's ``README.md``: Hugging Face model-card YAML front matter and a markdown body."""
    import yaml

    dataset = dict(config.get("dataset") or {})
    names = list(config["decoders"])
    summaries = (metrics or {}).get("decoders", {})
    licence, licence_text = card_licence(dataset)
    data_names = dataset_names(dataset)
    test_images = (metrics or {}).get("test_images")
    index = []
    for name in names:
        scores = _scores(summaries.get(name, {}))
        if not scores:
            continue
        index.append({"name": f"{run_name}/{name}", "results": [{
            "task": {"type": "image-to-text", "name": "Image Captioning"},
            "dataset": {"type": data_names[0], "name": ", ".join(data_names), "split": "test"},
            "metrics": [{"type": key.lower(), "name": CARD_METRICS[key], "value": round(value, 4)}
                        for key, value in scores.items()],
        }]})
    front: dict[str, Any] = {
        "library_name": "diffusion_captioner",
        "pipeline_tag": "image-to-text",
        "license": licence,
        "tags": ["image-captioning", "image-to-text", "clip", "diffusion_captioner",
                 *dict.fromkeys(str(config["decoders"][n]["decoder"].get("type", n)) for n in names)],
        "datasets": data_names,
        "metrics": ["bleu", "meteor", "rouge", "cider"],
    }
    if index:
        front["model-index"] = index
    where = where or "DIR"  # the folder a user downloaded or copied
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {run_name}: image-captioning decoders side by side", "",
             f"An export of a `dcap compare` run of diffusion_captioner: {len(names)} decoder(s) "
             f"({', '.join(names)}) trained on the same frozen CLIP features of "
             f"{', '.join(f'`{n}`' for n in data_names)} and scored by the same pycocoevalcap code "
             f"on its test split" + (f" ({test_images} images)." if test_images else "."), ""]
    lines += ["## Results", ""]
    if index:
        columns = [k for k in CARD_METRICS if any(k in _scores(summaries.get(n, {})) for n in names)]
        lines.append("| decoder | " + " | ".join(CARD_METRICS[k] for k in columns)
                     + " | params | train steps |")
        lines.append("|---" * (len(columns) + 3) + "|")
        for name in names:
            summary = summaries.get(name, {})
            scores = _scores(summary)
            params = (summary.get("parameters") or {}).get("total")
            cells = [f"{scores[k]:.3f}" if k in scores else "-" for k in columns]
            cells += [f"{params / 1e6:.2f}M" if params is not None else "-",
                      str(summary.get("train_steps", "-"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Test split, pycocoevalcap (PTB tokenizer); CLIP-S / RefCLIP-S with the run's "
                  "own encoder. `report.md` has the full report of the run.", ""]
    else:
        lines += ["No metrics recorded: the run folder had no `metrics.json` (an unfinished "
                  "`compare`).", ""]
    lines += ["## Use it", "", "```bash", f"dcap caption --run {where} --images photo.jpg",
              f"dcap serve --run {where}", "```", "", "```python",
              "import diffusion_captioner as dc", "",
              f'captions = dc.load_run("{where}").caption(["photo.jpg"])   # {{decoder: [caption]}}',
              "```", ""]
    lines += ["## How it was made", "", f"Command: `{config.get('command', 'dcap compare')}`", "",
              f"Preset: `{config.get('preset')}`; device `{config.get('device')}`; torch threads "
              f"{config.get('threads')}.", "",
              f"Encoder: `{json.dumps(encoder)}`"
              + (f" (its files are shipped in `{ENCODER_DIR}/`)." if shipped
                 else " (loaded by that name: open_clip fetches the weights)."), "",
              "| decoder | type | generation options | train steps | train time |",
              "|---|---|---|---|---|"]
    for name in names:
        plan = config["decoders"][name]
        summary = summaries.get(name, {})
        lines.append(f"| {name} | `{plan['decoder'].get('type')}` | "
                     f"`{json.dumps(plan.get('generate', {}))}` | {summary.get('train_steps', '-')} | "
                     f"{summary.get('train_seconds', '-')} s |")
    lines += ["", "Each decoder's full configuration is in `config.json`; its weights in "
              "`<decoder>/checkpoint/best/`.", ""]
    lines += ["## Dataset and licence", "", f"Dataset: `{json.dumps(dataset)}`.", "",
              f"Licence: {licence_text}", ""]
    return "\n".join(lines)


def read_front_matter(card: str) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` ... ``---`` at the top)."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    if match is None:
        raise ValueError("model card has no YAML front matter (--- ... --- at the top)")
    return yaml.safe_load(match.group(1))


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------
def require_hub(repo: str) -> None:
    """Fail at once, in one line, when the hub cannot be reached for ``--push-to-hub``."""
    from diffusion_captioner import hub

    if not hub.hub_available():
        raise ComponentError(
            f"--push-to-hub {repo}: the Hugging Face hub ({hub.hf_endpoint()}) is unavailable: "
            f"{hub._why_unreachable()}; nothing was written. Export without --push-to-hub and "
            f"upload the folder from a connected machine with `hf upload {repo} DIR`")


def push(folder: Path, repo: str) -> str:
    """Upload an export folder to the hub model repository ``repo`` (created when missing);
    returns the repository's URL. Failures are one line naming the repo and the way out."""
    from huggingface_hub import HfApi

    from diffusion_captioner import hub

    hub._short_timeouts()
    api = HfApi()
    try:
        url = str(api.create_repo(repo, exist_ok=True))
        api.upload_folder(repo_id=repo, folder_path=str(folder),
                          commit_message="dcap export: a diffusion_captioner run")
    except Exception as error:  # noqa: BLE001 - auth, network and HTTP errors: one line out
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ComponentError(f"--push-to-hub {repo}: upload failed ({type(error).__name__}: "
                             f"{reason}); the export is complete in {folder}: log in with `hf auth "
                             f"login` and upload it with `hf upload {repo} {folder}`") from error
    logger.info("pushed %s to %s", folder, url)
    return url

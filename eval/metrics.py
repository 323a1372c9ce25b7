"""COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE.

The pipeline is ``pycocoevalcap.eval.COCOEvalCap.evaluate`` restricted to the images that have a
result (as the coco-caption demo does by setting ``params['image_id'] = cocoRes.getImgIds()``):

1. every reference and candidate is tokenised by Stanford's PTBTokenizer (CoreNLP 3.4.1,
   ``-preserveLines -lowerCase``) and pycocoevalcap's punctuation tokens are dropped;
2. each scorer compares ``{image_id: [candidate]}`` with ``{image_id: [references]}``.

With c the candidate and R the references of one image:

- ``Bleu_n``: corpus BLEU, BP * exp(sum_{k<=n} log(p_k) / n), where the clipped k-gram precisions
  p_k and the lengths are pooled over all images and BP = min(1, exp(1 - r / len(c))) uses the
  closest reference length r. Per-image values apply the same formula to one sentence.
- ``METEOR`` (1.5, ``-l en -norm``): F_mean = P R / (alpha P + (1 - alpha) R) over exact, stem,
  synonym and paraphrase alignments, times (1 - fragmentation penalty), best over R. The corpus
  value comes from pooled statistics, so it is not the mean of the per-image values.
- ``ROUGE_L``: F_beta (beta = 1.2) of the longest common subsequence precision and recall, the
  maxima over R; corpus value = mean over images.
- ``CIDEr`` (CIDEr-D): 10 * mean_{r in R} mean_{n=1..4} of the cosine between clipped tf-idf
  n-gram vectors of c and r, times exp(-(len(c) - len(r))^2 / (2 * 6^2)). The idf is computed over
  the references of the scored images, so the value depends on which images are scored;
  corpus value = mean over images.
- ``SPICE``: F-score of scene-graph tuples parsed from c against those of R; corpus value = mean.

METEOR, the tokenizer and SPICE run Java. Nothing here downloads anything: SPICE needs the
Stanford CoreNLP 3.6.0 jars, which pycocoevalcap fetches on first use; when they are absent SPICE
is reported in ``MetricReport.skipped`` with the command that fetches them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pycocoevalcap.meteor.meteor as _meteor_module
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from eval.coco_format import (
    EvaluationInputError,
    atomic_write_json,
    load_annotations,
    load_results,
)

logger = logging.getLogger(__name__)

MetricName = Literal["Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
ALL_METRICS: tuple[MetricName, ...] = get_args(MetricName)
SCORE_NAMES: tuple[str, ...] = (
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "SPICE",
)
_REPORT_KEYS = ("skipped", "num_images", "seconds", "per_image")

PTB_JAR = Path(_ptb_module.__file__).with_name(_ptb_module.STANFORD_CORENLP_3_4_1_JAR)
METEOR_DIR = Path(_meteor_module.__file__).parent
SPICE_DIR = Path(_ptb_module.__file__).resolve().parents[1] / "spice"
SPICE_JAR_NAME = "spice-1.0.jar"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_FETCH_COMMAND = (
    "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
    "get_stanford_models()'"
)
JAVA_INSTALL_HINT = (
    "install one (Debian/Ubuntu: `apt-get install default-jre-headless`; "
    "conda: `conda install -c conda-forge openjdk`) and put `java` on PATH"
)

# Seconds a Java step may take before it is killed: base + per-item allowance.
TOKENIZER_TIMEOUT_S = (120.0, 0.01)  # per caption
METEOR_TIMEOUT_S = (300.0, 0.1)  # per image
SPICE_TIMEOUT_S = (1800.0, 1.0)  # per image

# Characters Stanford's PTBTokenizer treats as line breaks; one caption must stay one line.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")
_SENTINEL = "endofcaptionsentinel"


class JavaMissingError(EvaluationInputError):
    """No usable ``java``: METEOR, the PTB tokenizer and SPICE cannot run."""


class ScorerError(RuntimeError):
    """A Java scorer (tokenizer, METEOR) failed or timed out; one line with its last stderr."""


@dataclass
class MetricReport:
    """Scores of one result set.

    ``scores`` uses pycocoevalcap's names (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
    ``CIDEr``, ``SPICE``); ``per_image[name][image_id]`` holds the per-image value of each scored
    metric (for paired bootstrap); ``skipped`` maps a requested metric that could not run to the
    reason; ``seconds`` is the wall time of scoring.
    """

    scores: dict[str, float]
    per_image: dict[str, dict[int, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: scores at the top level, then skipped, num_images, seconds, per_image.

        Non-finite values (SPICE can give NaN) become ``null``; image ids become strings.
        """
        out: dict[str, Any] = {name: _finite_or_none(value) for name, value in self.scores.items()}
        out["skipped"] = dict(self.skipped)
        out["num_images"] = self.num_images
        out["seconds"] = round(self.seconds, 3)
        out["per_image"] = {
            name: {str(image_id): _finite_or_none(value) for image_id, value in values.items()}
            for name, values in self.per_image.items()
        }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The :meth:`to_dict` document as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricReport:
        """Inverse of :meth:`to_dict` (``null`` scores come back as NaN)."""
        scores = {
            name: _none_to_nan(value) for name, value in data.items() if name not in _REPORT_KEYS
        }
        per_image = {
            name: {int(image_id): _none_to_nan(value) for image_id, value in values.items()}
            for name, values in data.get("per_image", {}).items()
        }
        return cls(
            scores=scores,
            per_image=per_image,
            skipped=dict(data.get("skipped", {})),
            num_images=int(data.get("num_images", 0)),
            seconds=float(data.get("seconds", 0.0)),
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        return atomic_write_json(path, self.to_dict(), indent=2)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _timeout(spec: tuple[float, float], count: int) -> float:
    base, per_item = spec
    return base + per_item * count


def _stderr_tail(data: bytes | str, limit: int = 300) -> str:
    """Last non-empty stderr lines joined on one line (at most ``limit`` characters)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = " | ".join(lines[-3:])
    return tail if len(tail) <= limit else "..." + tail[-limit:]


# ----------------------------------------------------------------------------- Java


def find_java() -> str:
    """Path of a working ``java`` (>= 8) on PATH, else raise :class:`JavaMissingError`."""
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(
            "no `java` on PATH: METEOR and the PTB tokenizer need a Java runtime (>= 8); "
            + JAVA_INSTALL_HINT
        )
    major = _java_major_version(java)
    if major is not None and major < 8:
        raise JavaMissingError(
            f"`{java}` is Java {major}: METEOR and the PTB tokenizer need a Java runtime (>= 8); "
            + JAVA_INSTALL_HINT
        )
    return java


@functools.lru_cache(maxsize=8)
def _java_major_version(java: str) -> int | None:
    """Major version of ``java`` (8 for "1.8.0_312", 17 for "17.0.15"); None if unparsable.

    Raises :class:`JavaMissingError` when ``java -version`` does not run (e.g. macOS's stub).
    """
    try:
        proc = subprocess.run(
            [java, "-version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise JavaMissingError(
            f"`{java} -version` failed ({err}): METEOR and the PTB tokenizer need a working "
            f"Java runtime (>= 8); {JAVA_INSTALL_HINT}"
        ) from err
    text = (proc.stderr + proc.stdout).decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise JavaMissingError(
            f"`{java} -version` exited with {proc.returncode} ({_stderr_tail(text)}): METEOR and "
            f"the PTB tokenizer need a working Java runtime (>= 8); {JAVA_INSTALL_HINT}"
        )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        return None
    first = int(match.group(1))
    return int(match.group(2) or 0) if first == 1 else first


# ----------------------------------------------------------------------------- tokenizer


def ptb_tokenize(java: str, captions: Sequence[str]) -> list[str]:
    """Tokenise ``captions`` as pycocoevalcap's ``PTBTokenizer.tokenize`` does, one JVM call.

    Each caption -> Stanford PTBTokenizer (``-preserveLines -lowerCase``) -> tokens joined by
    spaces with pycocoevalcap's ``PUNCTUATIONS`` removed. Unlike pycocoevalcap's wrapper this
    writes its temporary file to the system temp folder (not into site-packages), turns every
    character the tokenizer reads as a line break into a space, and checks that the output lines
    line up with the input through a sentinel line.
    """
    lines_in = [_LINE_BREAKS.sub(" ", caption) for caption in captions]
    lines_in.append(_SENTINEL)
    timeout = _timeout(TOKENIZER_TIMEOUT_S, len(lines_in))
    with tempfile.TemporaryDirectory(prefix="dcap_ptb_") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(lines_in), encoding="utf-8")
        cmd = [
            java,
            "-cp",
            str(PTB_JAR),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            str(source),
        ]
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            raise ScorerError(
                f"PTB tokenizer ({PTB_JAR.name}) took over {timeout:.0f} s on {len(captions)} "
                "captions and was stopped"
            ) from err
        except OSError as err:
            raise ScorerError(f"PTB tokenizer could not start `{java}`: {err}") from err
    if proc.returncode != 0:
        raise ScorerError(
            f"PTB tokenizer ({PTB_JAR}) exited with {proc.returncode}: {_stderr_tail(proc.stderr)}"
        )
    logger.debug("PTBTokenizer: %s", _stderr_tail(proc.stderr))
    lines_out = proc.stdout.decode("utf-8", errors="replace").split("\n")
    n = len(captions)
    if len(lines_out) <= n or lines_out[n].strip() != _SENTINEL:
        raise ScorerError(
            f"PTB tokenizer returned {len(lines_out)} lines for {n} captions (+1 sentinel); "
            "its output does not line up with the input"
        )
    punctuation = set(_ptb_module.PUNCTUATIONS)
    return [
        " ".join(word for word in line.rstrip().split(" ") if word not in punctuation)
        for line in lines_out[:n]
    ]


# ----------------------------------------------------------------------------- METEOR


class _MeteorProcess(Meteor):
    """pycocoevalcap's METEOR 1.5 bridge with a bounded life.

    The scoring protocol (``compute_score``/``_stat``: SCORE lines, then one EVAL line answered
    by one line per image plus the corpus score) is pycocoevalcap's. What changes: the JVM gets
    ``-Dfile.encoding=UTF-8``; its stderr goes to a temp file (an unread pipe can fill and
    block it, and the file explains failures); a watchdog kills it after ``timeout`` seconds so a
    stuck JVM turns into an error instead of a hang; :meth:`close` ends it deterministically
    (pycocoevalcap's ``__del__`` takes a lock that ``compute_score`` never releases when it fails,
    which can hang at garbage collection). Use as a context manager.
    """

    def __init__(self, java: str, timeout: float) -> None:
        # Replaces Meteor.__init__ (not called): same command plus the encoding flag.
        self.meteor_cmd = [
            java,
            "-Xmx2G",
            "-Dfile.encoding=UTF-8",
            "-jar",
            _meteor_module.METEOR_JAR,
            "-",
            "-",
            "-stdio",
            "-l",
            "en",
            "-norm",
        ]
        self.lock = threading.Lock()
        self._timeout = timeout
        self._timed_out = False
        self._stderr = tempfile.TemporaryFile()
        try:
            self.meteor_p = subprocess.Popen(
                self.meteor_cmd,
                cwd=METEOR_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as err:
            self._stderr.close()
            raise ScorerError(f"METEOR could not start `{java}`: {err}") from err
        self._watchdog = threading.Timer(timeout, self._kill_for_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()

    def __enter__(self) -> _MeteorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _kill_for_timeout(self) -> None:
        self._timed_out = True
        self.meteor_p.kill()

    def _stat(self, hypothesis_str: str, reference_list: list[str]) -> str:
        # "|||" separates fields in METEOR's protocol; pycocoevalcap strips it from the
        # hypothesis only, a reference holding it would shift the fields.
        references = [ref.replace("|||", "").replace("  ", " ") for ref in reference_list]
        return super()._stat(hypothesis_str, references)

    def score(
        self, gts: Mapping[int, list[str]], res: Mapping[int, list[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and per-image METEOR, in ``gts`` key order."""
        try:
            score, scores = self.compute_score(gts, res)
        except (ValueError, OSError) as err:
            if self._timed_out:
                raise ScorerError(
                    f"METEOR took over {self._timeout:.0f} s on {len(gts)} images and was stopped"
                ) from err
            self._stderr.seek(0)
            detail = _stderr_tail(self._stderr.read()) or f"{type(err).__name__}: {err}"
            raise ScorerError(
                f"METEOR ({_meteor_module.METEOR_JAR}, java -Xmx2G) failed: {detail}"
            ) from err
        return float(score), [float(value) for value in scores]

    def close(self) -> None:
        """Stop the JVM and reap it; safe to call more than once."""
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.cancel()
        process = getattr(self, "meteor_p", None)
        if process is not None:
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            if process.poll() is None:
                process.kill()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("METEOR JVM (pid %d) did not exit after kill", process.pid)
        stderr = getattr(self, "_stderr", None)
        if stderr is not None and not stderr.closed:
            stderr.close()

    def __del__(self) -> None:
        self.close()


# ----------------------------------------------------------------------------- SPICE


def spice_unavailable_reason(spice_dir: Path | None = None) -> str | None:
    """Why SPICE cannot run offline (a one-line reason), or None when its jars are all present.

    Checks files only; unlike pycocoevalcap's ``Spice()`` this never downloads CoreNLP.
    """
    spice_dir = SPICE_DIR if spice_dir is None else spice_dir
    jar = spice_dir / SPICE_JAR_NAME
    if not jar.is_file():
        return f"SPICE jar not found at {jar}; reinstall pycocoevalcap (pip install pycocoevalcap)"
    lib = spice_dir / "lib"
    missing = [name for name in CORENLP_JARS if not (lib / name).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP 3.6.0 models not found in {lib} (missing {', '.join(missing)}); "
            f"run `{SPICE_FETCH_COMMAND}` once with network"
        )
    return None


def _spice_command(java: str, in_file: Path, out_file: Path) -> list[str]:
    """The SPICE 1.0 command line (pycocoevalcap's, without ``-cache``).

    ``-cache`` makes SPICE serialise parses with FST, which fails on Java >= 9
    (InaccessibleObjectException on java.lang.String.value), so parses are not cached.
    """
    return [
        java,
        "-Xmx8G",
        "-jar",
        str(SPICE_DIR / SPICE_JAR_NAME),
        str(in_file),
        "-out",
        str(out_file),
        "-subset",
        "-silent",
    ]


class _SpiceUnavailable(Exception):
    """SPICE did not produce scores; the message is the reason for ``MetricReport.skipped``."""


def _run_spice(
    java: str, ids: Sequence[int], gts: Mapping[int, list[str]], res: Mapping[int, list[str]]
) -> tuple[float, list[float]]:
    """Mean SPICE F-score and per-image F-scores (``ids`` order), as pycocoevalcap's ``Spice``."""
    timeout = _timeout(SPICE_TIMEOUT_S, len(ids))
    with tempfile.TemporaryDirectory(prefix="dcap_spice_") as tmp:
        in_file = Path(tmp) / "input.json"
        out_file = Path(tmp) / "output.json"
        payload = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
        in_file.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        try:
            proc = subprocess.run(
                _spice_command(java, in_file, out_file),
                cwd=SPICE_DIR,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise _SpiceUnavailable(
                f"SPICE took over {timeout:.0f} s on {len(ids)} images and was stopped"
            ) from err
        except OSError as err:
            raise _SpiceUnavailable(f"SPICE could not start `{java}`: {err}") from err
        if proc.returncode != 0:
            raise _SpiceUnavailable(
                f"SPICE exited with {proc.returncode}: {_stderr_tail(proc.stderr)}"
            )
        try:
            results = json.loads(out_file.read_text(encoding="utf-8"))
            by_id = {int(item["image_id"]): item["scores"]["All"]["f"] for item in results}
            per_image = [_float_or_nan(by_id[i]) for i in ids]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _SpiceUnavailable(
                f"SPICE output could not be read ({type(err).__name__}: {err})"
            ) from err
    return float(np.mean(np.array(per_image))), per_image


def _float_or_nan(value: Any) -> float:
    """pycocoevalcap's ``Spice.float_convert``: a float, NaN when SPICE gave none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- scoring


def _normalise_metrics(metrics: str | Iterable[str]) -> list[MetricName]:
    """Metric families to run, in canonical order; ``Bleu_4`` etc. select ``Bleu``."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    wanted: set[str] = set()
    for name in names:
        family = "Bleu" if re.fullmatch(r"Bleu(_[1-4])?", name) else name
        if family not in ALL_METRICS:
            raise EvaluationInputError(
                f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}"
            )
        wanted.add(family)
    if not wanted:
        raise EvaluationInputError(f"no metrics requested; choose from {', '.join(ALL_METRICS)}")
    return [name for name in ALL_METRICS if name in wanted]


def _check_inputs(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    results_name: str = "results",
    references_name: str = "references",
) -> list[int]:
    """Validate results against references; return the result image ids, sorted."""
    if not results:
        raise EvaluationInputError(f"{results_name}: no captions to score")
    for image_id in results:
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
            raise EvaluationInputError(
                f"{results_name}: image id {image_id!r} is not an integer; COCO image ids are ints"
            )
    missing = [image_id for image_id in results if image_id not in references]
    if missing:
        examples = ", ".join(repr(image_id) for image_id in sorted(missing, key=str)[:5])
        raise EvaluationInputError(
            f"{results_name}: {len(missing)} of {len(results)} image ids are not in "
            f"{references_name} (e.g. {examples}); score captions against the annotations "
            "of the split they were generated for"
        )
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise EvaluationInputError(
                f"{results_name}: caption of image {image_id!r} is {type(caption).__name__}, "
                "not str"
            )
        refs = references[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise EvaluationInputError(
                f"{references_name}: image {image_id!r} needs a non-empty list of reference "
                "caption strings"
            )
    return sorted(results)


def score_captions(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    metrics: str | Sequence[str] = ALL_METRICS,
) -> MetricReport:
    """Score ``results`` (image id -> caption) against ``references`` (image id -> captions).

    Scores are computed over the images in ``results``; each must be in ``references``
    (else :class:`EvaluationInputError`). Raises :class:`JavaMissingError` without a Java
    runtime and :class:`ScorerError` if the tokenizer or METEOR fails. SPICE never raises: when
    it cannot run, it is listed in ``skipped`` with the reason.
    """
    return _score(results, references, metrics, "results", "references")


def _score(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    metrics: str | Sequence[str],
    results_name: str,
    references_name: str,
) -> MetricReport:
    start = time.perf_counter()
    wanted = _normalise_metrics(metrics)
    ids = _check_inputs(results, references, results_name, references_name)
    java = find_java()
    if len(ids) < len(references):
        logger.info(
            "scoring the %d of %d reference images that have a result", len(ids), len(references)
        )

    skipped: dict[str, str] = {}
    if "SPICE" in wanted and (reason := spice_unavailable_reason()) is not None:
        skipped["SPICE"] = reason
        logger.warning("SPICE skipped: %s", reason)

    scores: dict[str, float] = {}
    per_image: dict[str, list[float]] = {}
    # Start METEOR's JVM first: loading its paraphrase table overlaps tokenisation and BLEU/CIDEr.
    meteor = (
        _MeteorProcess(java, _timeout(METEOR_TIMEOUT_S, len(ids))) if "METEOR" in wanted else None
    )
    try:
        gts, res = _tokenize(java, ids, results, references)
        if "Bleu" in wanted:
            bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                scores[f"Bleu_{n + 1}"] = float(bleu[n])
                per_image[f"Bleu_{n + 1}"] = [float(v) for v in bleu_per_image[n]]
        if "ROUGE_L" in wanted:
            rouge, rouge_per_image = Rouge().compute_score(gts, res)
            scores["ROUGE_L"] = float(rouge)
            per_image["ROUGE_L"] = [float(v) for v in rouge_per_image]
        if "CIDEr" in wanted:
            cider, cider_per_image = Cider().compute_score(gts, res)
            scores["CIDEr"] = float(cider)
            per_image["CIDEr"] = [float(v) for v in cider_per_image]
        if meteor is not None:
            scores["METEOR"], per_image["METEOR"] = meteor.score(gts, res)
    finally:
        if meteor is not None:
            meteor.close()

    if "SPICE" in wanted and "SPICE" not in skipped:
        try:
            scores["SPICE"], per_image["SPICE"] = _run_spice(java, ids, gts, res)
        except _SpiceUnavailable as err:
            skipped["SPICE"] = " ".join(str(err).split())
            logger.warning("SPICE skipped: %s", skipped["SPICE"])

    seconds = time.perf_counter() - start
    ordered = {name: scores[name] for name in SCORE_NAMES if name in scores}
    report = MetricReport(
        scores=ordered,
        per_image={
            name: dict(zip(ids, per_image[name], strict=True))
            for name in SCORE_NAMES
            if name in per_image
        },
        skipped=skipped,
        num_images=len(ids),
        seconds=seconds,
    )
    logger.info(
        "scored %d images in %.1f s: %s",
        len(ids),
        seconds,
        ", ".join(f"{name}={value:.3f}" for name, value in ordered.items()),
    )
    return report


def _tokenize(
    java: str,
    ids: Sequence[int],
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenise references and candidates in one JVM call; both dicts keyed in ``ids`` order."""
    flat_refs = [ref for image_id in ids for ref in references[image_id]]
    tokens = ptb_tokenize(java, flat_refs + [results[image_id] for image_id in ids])
    gts: dict[int, list[str]] = {}
    cursor = 0
    for image_id in ids:
        count = len(references[image_id])
        gts[image_id] = tokens[cursor : cursor + count]
        cursor += count
    res = {image_id: [tokens[cursor + k]] for k, image_id in enumerate(ids)}
    return gts, res


def evaluate_files(
    results_path: str | os.PathLike[str],
    annotations_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    metrics: str | Sequence[str] = ALL_METRICS,
) -> MetricReport:
    """Score a COCO result file against a COCO captions annotation file.

    When ``out_path`` is given, the metrics JSON (:meth:`MetricReport.to_dict`: pycocoevalcap
    names at the top level, ``skipped``, ``num_images``, ``seconds``, ``per_image``) is written
    there atomically.
    """
    results = load_results(results_path)
    references = load_annotations(annotations_path)
    report = _score(
        results,
        references,
        metrics,
        f"results file {results_path}",
        f"annotation file {annotations_path}",
    )
    if out_path is not None:
        report.write(out_path)
        logger.info("wrote metrics to %s", out_path)
    return report

"""The Java side of pycocoevalcap, run so that it can neither hang nor die silently.

``find_java`` checks for a usable runtime (>= 8) and says in one line how to install one;
``ptb_tokenize`` runs Stanford's PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``) on
every caption in one process, one caption per line; ``MeteorProcess`` is pycocoevalcap's METEOR
1.5 with a timeout and a readable failure; SPICE runs only when its CoreNLP 3.6.0 models are
installed (``spice_unavailable_reason`` says why not, and how to fetch them). Every Java step has
a time limit of base + per-item seconds and fails with :class:`ScorerError` naming its last
stderr line.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocoevalcap.meteor.meteor as _meteor_module
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_module
from pycocoevalcap.meteor.meteor import Meteor

from eval.coco_format import EvaluationInputError

logger = logging.getLogger(__name__)

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




def timeout_for(spec: tuple[float, float], count: int) -> float:
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
    timeout = timeout_for(TOKENIZER_TIMEOUT_S, len(lines_in))
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


class MeteorProcess(Meteor):
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
        self.timeout_for = timeout
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

    def __enter__(self) -> MeteorProcess:
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
                    f"METEOR took over {self.timeout_for:.0f} s on {len(gts)} images and was stopped"
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


class SpiceUnavailable(Exception):
    """SPICE did not produce scores; the message is the reason for ``MetricReport.skipped``."""


def run_spice(
    java: str, ids: Sequence[int], gts: Mapping[int, list[str]], res: Mapping[int, list[str]]
) -> tuple[float, list[float]]:
    """Mean SPICE F-score and per-image F-scores (``ids`` order), as pycocoevalcap's ``Spice``."""
    timeout = timeout_for(SPICE_TIMEOUT_S, len(ids))
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
            raise SpiceUnavailable(
                f"SPICE took over {timeout:.0f} s on {len(ids)} images and was stopped"
            ) from err
        except OSError as err:
            raise SpiceUnavailable(f"SPICE could not start `{java}`: {err}") from err
        if proc.returncode != 0:
            raise SpiceUnavailable(
                f"SPICE exited with {proc.returncode}: {_stderr_tail(proc.stderr)}"
            )
        try:
            results = json.loads(out_file.read_text(encoding="utf-8"))
            by_id = {int(item["image_id"]): item["scores"]["All"]["f"] for item in results}
            per_image = [_float_or_nan(by_id[i]) for i in ids]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SpiceUnavailable(
                f"SPICE output could not be read ({type(err).__name__}: {err})"
            ) from err
    return float(np.mean(np.array(per_image))), per_image


def _float_or_nan(value: Any) -> float:
    """pycocoevalcap's ``Spice.float_convert``: a float, NaN when SPICE gave none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

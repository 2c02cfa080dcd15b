"""Measuring `minigpt prepare` for `minigpt bench`: a generated corpus, prepared in a fresh interpreter.

The child process imports minigpt.data only (not torch), so the peak memory it reports is
prepare's own. This module imports no torch either: it is what that child runs.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from minigpt import data
from minigpt.config import DataConfig
from minigpt.errors import MiniGPTError


class BenchError(MiniGPTError):
    """A measurement could not be made (e.g. the prepare child process failed)."""


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """Write about `n_bytes` of generated word-like text (mostly ASCII, a few accented words)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    words += ["café", "naïve", "Zürich", "señor", "—"]
    lines = []
    for _ in range(20000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        lines.append(line.capitalize() + rng.choice(".,;:!?"))
    block = ("\n".join(lines) + "\n\n").encode("utf-8")
    with open(path, "wb") as f:
        written = 0
        while written < n_bytes:
            piece = block[: n_bytes - written]
            while piece and (piece[-1] & 0xC0) == 0x80:  # never cut a UTF-8 character in two
                piece = piece[:-1]
            if not piece:
                break
            f.write(piece)
            written += len(piece)
    return path


def measure_prepare(megabytes: float, workdir: Path) -> dict:
    """Generate a corpus of `megabytes` MB and prepare it in a child process: MB/s and peak RSS."""
    corpus = write_corpus(workdir / "prepare_corpus.txt", int(megabytes * 1024 * 1024), seed=1)
    child = subprocess.run([sys.executable, "-m", "minigpt.benchprep", str(corpus), str(workdir / "prepare_out")],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise BenchError(f"prepare of the generated corpus failed in its child process: {child.stderr.strip()[-500:]}")
    result = json.loads(child.stdout)
    size_mb = corpus.stat().st_size / (1024 * 1024)
    corpus.unlink()
    return {"mb": size_mb, "mb_per_s": size_mb / result["seconds"], **result}


def prepare_in_this_process(corpus: str, out_dir: str) -> dict:
    """Prepare `corpus` into `out_dir` from scratch: seconds taken, and peak memory before and after."""
    before = peak_rss_mb()
    start = time.perf_counter()
    data.prepare(DataConfig(path=corpus, prepared_dir=out_dir), block_size=8, force=True)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "start_rss_mb": before}


if __name__ == "__main__":  # the child process of measure_prepare: python -m minigpt.benchprep CORPUS OUT_DIR
    print(json.dumps(prepare_in_this_process(sys.argv[1], sys.argv[2])))

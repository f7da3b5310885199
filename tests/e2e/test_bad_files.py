"""Bad files at startup: the real `cats-serve` exits non-zero with one clear message.

Every case starts the console script on a broken model or thresholds file. It must exit
non-zero (bounded wait), print one `cats-serve: ...` message on stderr that names the file and
what is wrong with it, and never print a traceback. The cases run as parallel processes, so the
whole set costs about one cold start per core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from api_support import TINY_HALF_THRESHOLD, write_thresholds

pytestmark = pytest.mark.slow

EXIT_TIMEOUT_S = 300  # bound on a failing start: imports torch on a busy 2-core machine


@dataclass
class Case:
    args: list[str]
    names: str  # the path the message must name
    says: str  # what the message must say about it (case-insensitive)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def cats_serve() -> str:
    beside = Path(sys.executable).with_name("cats-serve")
    found = str(beside) if beside.exists() else shutil.which("cats-serve")
    assert found, "the cats-serve console script is not installed (pip install -e .[test])"
    return found


def build_cases(tiny: Path, tmp: Path) -> dict[str, Case]:
    good = json.loads(
        write_thresholds(tiny, 0.5, TINY_HALF_THRESHOLD, tmp / "good.json").read_text()
    )

    def thresholds(name: str, change) -> Path:
        data = json.loads(json.dumps(good))
        change(data)
        path = tmp / name
        # allow_nan: the NaN case writes a bare NaN token, as a careless tool would
        path.write_text(json.dumps(data, allow_nan=True))
        return path

    def broken_copy(name: str, file: str, content: bytes | None) -> Path:
        out = tmp / name
        shutil.copytree(tiny, out)
        if content is None:
            (out / file).unlink()
        else:
            (out / file).write_bytes(content)
        return out

    def other_model(d):
        d["model"].update(name="some-other-model", fingerprint="sha256:0123456789abcdef")

    def more_layers(d):
        d["model"]["num_layers"] += 1
        for key in ("thresholds", "layer_sparsity"):
            d[key].append(d[key][-1])
        d["heldout"]["layer_sparsity"].append(0.5)

    def nan_threshold(d):
        d["thresholds"][0] = float("nan")

    bad_config = broken_copy("bad-config", "config.json", b"{ this is not json")
    bad_weights = broken_copy("bad-weights", "model.safetensors", b"\x00" * 64)
    no_weights = broken_copy("no-weights", "model.safetensors", None)
    bad_gguf = tmp / "corrupt.gguf"
    bad_gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    layers, inter = good["model"]["num_layers"], good["model"]["intermediate_size"]
    weighted = write_thresholds(
        tiny, 0.3, TINY_HALF_THRESHOLD, tmp / "weighted.json", [[2.0] * inter] * layers
    )
    truncated = tmp / "truncated.json"
    truncated.write_text(json.dumps(good)[:60])
    model = ["--model", str(tiny)]
    return {
        "model-dir-missing": Case(
            ["--model", str(tmp / "nowhere")], str(tmp / "nowhere"), "neither"
        ),
        "model-config-corrupt": Case(["--model", str(bad_config)], str(bad_config), "config"),
        "model-weights-corrupt": Case(["--model", str(bad_weights)], str(bad_weights), "header"),
        "model-weights-missing": Case(["--model", str(no_weights)], str(no_weights), "no file"),
        "gguf-missing": Case(["--model", str(tmp / "gone.gguf")], "gone.gguf", "does not exist"),
        "gguf-corrupt": Case(["--model", str(bad_gguf)], str(bad_gguf), "cannot read gguf"),
        "thresholds-missing": Case(
            [*model, "--thresholds", str(tmp / "absent.json")], "absent.json", "does not exist"
        ),
        "thresholds-not-json": Case(
            [*model, "--thresholds", str(truncated)], str(truncated), "not valid json"
        ),
        "thresholds-other-model": Case(
            [*model, "--thresholds", str(thresholds("other.json", other_model))],
            "other.json",
            "model.fingerprint does not match",
        ),
        "thresholds-layer-count": Case(
            [*model, "--thresholds", str(thresholds("layers.json", more_layers))],
            "layers.json",
            "model.num_layers does not match the model: expected 2, found 3",
        ),
        "thresholds-version": Case(
            [*model, "--thresholds", str(thresholds("v9.json", lambda d: d.update(version=9)))],
            "v9.json",
            "field version: expected 1, 2 or 3, found 9",
        ),
        "thresholds-mixed-criteria": Case(
            [*model, "--thresholds", str(tmp / "good.json"), str(weighted)],
            "weighted.json",
            "criterion 'up_rms' differs",
        ),
        "thresholds-nan": Case(
            [*model, "--thresholds", str(thresholds("nan.json", nan_threshold))],
            "nan.json",
            "thresholds[0]: expected a finite number",
        ),
    }


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[Case, Run]]:
    """Start every case at once; wait for all of them (each wait bounded)."""
    cases = build_cases(tiny_checkpoint, tmp_path_factory.mktemp("bad-files"))
    assert sorted(cases) == sorted(CASE_NAMES)  # every case built is also a test below
    base = [cats_serve(), "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
    procs = {
        name: subprocess.Popen(
            [*base, *case.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, case in cases.items()
    }
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
            out[name] = (cases[name], Run(proc.returncode, stdout, stderr))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


CASE_NAMES = [
    "model-dir-missing",
    "model-config-corrupt",
    "model-weights-corrupt",
    "model-weights-missing",
    "gguf-missing",
    "gguf-corrupt",
    "thresholds-missing",
    "thresholds-not-json",
    "thresholds-other-model",
    "thresholds-layer-count",
    "thresholds-version",
    "thresholds-nan",
    "thresholds-mixed-criteria",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_file_fails_with_one_clear_message(runs, name):
    case, run = runs[name]
    everything = run.stdout + run.stderr
    assert run.code != 0, everything
    assert "Traceback" not in everything, everything
    # the message: from the one line that starts with "cats-serve:" to the end of stderr
    lines = run.stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("cats-serve: ")]
    assert len(starts) == 1, run.stderr
    message = "\n".join(lines[starts[0] :])
    assert len(message.splitlines()) <= 3, message
    assert case.names in message, message
    assert case.says.lower() in message.lower(), message

"""The CATS thresholds file: one versioned JSON format, written and validated here only.

A file holds the thresholds of one sparsity level for one model:

    {
      "format": "cats-thresholds", "version": 3,
      "model": {"name", "num_layers", "hidden_size", "intermediate_size", "fingerprint"},
      "target_sparsity": 0.5,          # the level a request names (`sparsity` field)
      "mode": "uniform" | "allocated",
      "mean_sparsity": 0.5,            # mean over layers of the per-layer calibration sparsity
      "layer_sparsity": [L floats],    # the row sparsity each layer's thresholds were taken at
      "thresholds": [L floats],        # t per layer: neuron i is inactive iff score_i <= t
      "down_thresholds": null | [L],   # two-threshold mode: t_down per layer on |a_i|
      "layer_up_sparsity": null | [L], # two-threshold mode: the W_up share of layer_sparsity
      "criterion": "silu" | "up_rms",  # the score: |SiLU(gate_i)|, or that times s_i
      "neuron_scale": null | [L][I],   # s per layer and neuron (up_rms only), positive
      "calibration": {"source", "documents", "tokens", "bins", "bin_width", "notes"},
      "heldout": {"source", "tokens", "layer_sparsity": [L floats], "mean_sparsity"}
    }

Row sparsity, the one quantity a level names: the fraction of the MLP's W_up and W_down weight
rows a token does not need (neuron i's row of each). With one threshold a neuron needs both
rows or neither, so row sparsity is the fraction of inactive neurons (versions 1 and 2 called
it sparsity; it means the same there). Two-threshold mode (`down_thresholds` set): neuron i
needs its W_up row when score_i > t, and also its W_down row when |a_i| > t_down, where
a_i = SiLU(gate_i) * up_i; a layer whose up rows are dropped at fraction u and down rows at
d >= u has row sparsity (u + d) / 2 (`layer_up_sparsity` holds u). The held-out figures are
the row sparsity realised on held-out text.

Criteria: "silu" is the CATS paper's, score_i = |SiLU(gate_i)|. "up_rms" weights it per neuron,
score_i = |SiLU(gate_i)| * s_i with s_i the root mean square of neuron i's up projection over
the calibration tokens, divided by the layer's mean (so thresholds keep their scale): a neuron
whose up output is usually large is dropped less readily. Version 1 files (no criterion) are
"silu" files and still load. Sparsity always means the fraction of MLP neurons with
score <= t (inactive). Version 2 files (one threshold per layer) read as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "cats-thresholds"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MODES = ("uniform", "allocated")
CRITERIA = ("silu", "up_rms")


class ThresholdsFileError(ValueError):
    """A thresholds file is unreadable or does not match the model; the message names both."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    fingerprint: str


@dataclass(frozen=True)
class CalibrationInfo:
    source: str  # "builtin:lambada" or "file:<path> sha256:<digest>"
    documents: int
    tokens: int  # real (non-padding) tokens histogrammed
    bins: int  # histogram bins per layer (plus one overflow bin)
    bin_width: float
    notes: str = ""


@dataclass(frozen=True)
class HeldoutInfo:
    source: str
    tokens: int
    layer_sparsity: list[float]  # realised with these thresholds applied, per layer
    mean_sparsity: float


@dataclass(frozen=True)
class ThresholdsFile:
    model: ModelInfo
    target_sparsity: float
    mode: str
    mean_sparsity: float
    layer_sparsity: list[float]
    thresholds: list[float]
    calibration: CalibrationInfo
    heldout: HeldoutInfo
    extra: dict[str, Any] = field(default_factory=dict)  # free-form diagnostics (e.g. KL)
    criterion: str = "silu"
    neuron_scale: list[list[float]] | None = None  # [L][I] with criterion "up_rms"
    down_thresholds: list[float] | None = None  # [L]: two-threshold mode
    layer_up_sparsity: list[float] | None = None  # [L]: two-threshold mode
    path: Path | None = None

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def two_threshold(self) -> bool:
        return self.down_thresholds is not None

    def layer_thresholds(self) -> list[float] | list[tuple[float, float]]:
        """One value per layer as calibration passes them (calibration/pairs.py): t_up, or
        (t_up, t_down) pairs for a two-threshold file."""
        if self.down_thresholds is None:
            return list(self.thresholds)
        return list(zip(self.thresholds, self.down_thresholds, strict=True))

    def threshold_pairs(self) -> list[list[float]]:
        """[2][L]: t_up per layer, then t_down (0 for a single-threshold file)."""
        down = self.down_thresholds or [0.0] * len(self.thresholds)
        return [list(self.thresholds), list(down)]

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        body = asdict(self)
        body.pop("path")
        out.update(body)
        return out


def save_thresholds(file: ThresholdsFile, path: Path) -> Path:
    """Write `file` as JSON to `path` (validated on the way out, so a bad file is never saved).

    Indented, except that the [L][I] neuron_scale is written one layer per line.
    """
    data = file.to_json()
    _parse(data, path)
    scale = data.pop("neuron_scale")
    text = json.dumps(data, indent=1)
    if scale is None:
        text = text[:-2] + ',\n "neuron_scale": null\n}'
    else:
        rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in scale)
        text = text[:-2] + f',\n "neuron_scale": [\n  {rows}\n ]\n}}'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def load_thresholds(
    path: Path,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    fingerprint: str | None,
) -> ThresholdsFile:
    """Read and validate a thresholds file against the model it is to be used with.

    fingerprint=None skips the weight check (sizes are always checked). Raises
    ThresholdsFileError naming the file, the field and expected versus found.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ThresholdsFileError(f"thresholds file {path}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ThresholdsFileError(f"thresholds file {path}: not valid JSON ({exc})") from exc
    file = _parse(data, path)
    expected = {
        "model.num_layers": (num_layers, file.model.num_layers),
        "model.hidden_size": (hidden_size, file.model.hidden_size),
        "model.intermediate_size": (intermediate_size, file.model.intermediate_size),
    }
    if fingerprint is not None:
        expected["model.fingerprint"] = (fingerprint, file.model.fingerprint)
    for name, (want, found) in expected.items():
        if want != found:
            raise ThresholdsFileError(
                f"thresholds file {path}: field {name} does not match the model: "
                f"expected {want!r}, found {found!r}"
                + (" (calibrated for other weights?)" if name == "model.fingerprint" else "")
            )
    return file


# ---- parsing ---------------------------------------------------------------------------------


class _Reader:
    """Typed access to nested JSON fields with errors that name the file and the field."""

    def __init__(self, path: Path | None):
        self.path = path

    def fail(self, name: str, expected: str, found: Any) -> ThresholdsFileError:
        shown = repr(found)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return ThresholdsFileError(
            f"thresholds file {self.path}: field {name}: expected {expected}, found {shown}"
        )

    def get(self, obj: dict, key: str, prefix: str = "") -> Any:
        name = prefix + key
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(name, "a value", "nothing (missing)")
        return obj[key]

    def obj(self, obj: dict, key: str, prefix: str = "") -> dict:
        value = self.get(obj, key, prefix)
        if not isinstance(value, dict):
            raise self.fail(prefix + key, "an object", value)
        return value

    def str_(self, obj: dict, key: str, prefix: str = "") -> str:
        value = self.get(obj, key, prefix)
        if not isinstance(value, str):
            raise self.fail(prefix + key, "a string", value)
        return value

    def int_(self, obj: dict, key: str, prefix: str = "", minimum: int = 0) -> int:
        value = self.get(obj, key, prefix)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(prefix + key, f"an integer >= {minimum}", value)
        return value

    def num(self, value: Any, name: str, lo: float, hi: float) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise self.fail(name, f"a finite number in [{lo}, {hi}]", value)
        return float(value)

    def float_(self, obj: dict, key: str, prefix: str = "", lo=0.0, hi=1.0) -> float:
        return self.num(self.get(obj, key, prefix), prefix + key, lo, hi)

    def floats(self, obj: dict, key: str, length: int, prefix="", lo=0.0, hi=1.0) -> list[float]:
        value = self.get(obj, key, prefix)
        name = prefix + key
        if not isinstance(value, list) or len(value) != length:
            found = f"a list of {len(value)}" if isinstance(value, list) else value
            raise self.fail(name, f"a list of {length} numbers (one per layer)", found)
        return [self.num(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(value)]


def _parse(data: Any, path: Path | None) -> ThresholdsFile:
    r = _Reader(path)
    if not isinstance(data, dict):
        raise r.fail("(top level)", "a JSON object", data)
    fmt = r.get(data, "format")
    if fmt != FORMAT_NAME:
        raise r.fail("format", repr(FORMAT_NAME), fmt)
    version = r.get(data, "version")
    if version not in READABLE_VERSIONS:
        *first, last = map(str, READABLE_VERSIONS)
        raise r.fail("version", f"{', '.join(first)} or {last}", version)

    m = r.obj(data, "model")
    model = ModelInfo(
        name=r.str_(m, "name", "model."),
        num_layers=r.int_(m, "num_layers", "model.", minimum=1),
        hidden_size=r.int_(m, "hidden_size", "model.", minimum=1),
        intermediate_size=r.int_(m, "intermediate_size", "model.", minimum=1),
        fingerprint=r.str_(m, "fingerprint", "model."),
    )
    n = model.num_layers
    mode = r.get(data, "mode")
    if mode not in MODES:
        raise r.fail("mode", " or ".join(repr(x) for x in MODES), mode)
    thresholds = r.floats(data, "thresholds", n, lo=0.0, hi=math.inf)

    c = r.obj(data, "calibration")
    calibration = CalibrationInfo(
        source=r.str_(c, "source", "calibration."),
        documents=r.int_(c, "documents", "calibration."),
        tokens=r.int_(c, "tokens", "calibration."),
        bins=r.int_(c, "bins", "calibration."),
        bin_width=r.float_(c, "bin_width", "calibration.", lo=0.0, hi=math.inf),
        notes=c.get("notes", "") if isinstance(c.get("notes", ""), str) else "",
    )
    h = r.obj(data, "heldout")
    heldout = HeldoutInfo(
        source=r.str_(h, "source", "heldout."),
        tokens=r.int_(h, "tokens", "heldout."),
        layer_sparsity=r.floats(h, "layer_sparsity", n, "heldout."),
        mean_sparsity=r.float_(h, "mean_sparsity", "heldout."),
    )
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise r.fail("extra", "an object", extra)
    criterion, neuron_scale = "silu", None
    if version >= 2:
        criterion = r.get(data, "criterion")
        if criterion not in CRITERIA:
            raise r.fail("criterion", " or ".join(repr(x) for x in CRITERIA), criterion)
        neuron_scale = _neuron_scale(r, data, criterion, n, model.intermediate_size)
    down_thresholds = layer_up = None
    if version >= 3:
        down_thresholds = _optional_floats(r, data, "down_thresholds", n, math.inf)
        layer_up = _optional_floats(r, data, "layer_up_sparsity", n, 1.0)
        if (down_thresholds is None) != (layer_up is None):
            raise r.fail(
                "layer_up_sparsity",
                "a list exactly when down_thresholds is one (two-threshold mode)",
                data.get("layer_up_sparsity"),
            )
    return ThresholdsFile(
        model=model,
        target_sparsity=r.float_(data, "target_sparsity", hi=0.999),
        mode=mode,
        mean_sparsity=r.float_(data, "mean_sparsity"),
        layer_sparsity=r.floats(data, "layer_sparsity", n),
        thresholds=thresholds,
        calibration=calibration,
        heldout=heldout,
        extra=extra,
        criterion=criterion,
        neuron_scale=neuron_scale,
        down_thresholds=down_thresholds,
        layer_up_sparsity=layer_up,
        path=path,
    )


def _optional_floats(r: _Reader, data: dict, key: str, layers: int, hi: float):
    """null, or a list of `layers` finite numbers in [0, hi]."""
    if r.get(data, key) is None:
        return None
    return r.floats(data, key, layers, lo=0.0, hi=hi)


def _neuron_scale(r: _Reader, data: dict, criterion: str, layers: int, inter: int):
    """null for "silu"; for "up_rms" [layers][inter] finite positive numbers."""
    value = r.get(data, "neuron_scale")
    if criterion == "silu":
        if value is not None:
            raise r.fail("neuron_scale", "null (criterion 'silu')", value)
        return None
    if not isinstance(value, list) or len(value) != layers:
        found = f"a list of {len(value)}" if isinstance(value, list) else value
        raise r.fail("neuron_scale", f"a list of {layers} lists (one per layer)", found)
    out = []
    for i, row in enumerate(value):
        name = f"neuron_scale[{i}]"
        if not isinstance(row, list) or len(row) != inter:
            found = f"a list of {len(row)}" if isinstance(row, list) else row
            raise r.fail(name, f"a list of {inter} numbers (one per neuron)", found)
        bad = next((j for j, v in enumerate(row) if not _positive_number(v)), None)
        if bad is not None:
            raise r.fail(f"{name}[{bad}]", "a finite number > 0", row[bad])
        out.append([float(v) for v in row])
    return out


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf

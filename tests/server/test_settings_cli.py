"""Settings: CLI flags and CATS_* variables mirror each other; bad values fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cats_serve.server.cli import main, settings_from_args
from cats_serve.server.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_flags_reach_settings():
    s = settings_from_args(
        ["--max-batch-size", "4", "--port", "9000", "--no-cuda-graphs", "--dtype", "float16"]
    )
    assert (s.max_batch_size, s.port, s.cuda_graphs, s.dtype) == (4, 9000, False, "float16")
    assert s.pipeline_steps  # on by default
    assert not settings_from_args(["--no-pipeline-steps"]).pipeline_steps


def test_environment_reaches_settings(monkeypatch):
    monkeypatch.setenv("CATS_MAX_SEQ_LEN", "512")
    monkeypatch.setenv("CATS_API_KEY", "k")
    s = Settings()
    assert (s.max_seq_len, s.api_key) == (512, "k")


def test_flag_wins_over_environment(monkeypatch):
    monkeypatch.setenv("CATS_PORT", "7000")
    assert settings_from_args(["--port", "7001"]).port == 7001


def test_thresholds_take_several_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    assert settings_from_args(["--thresholds", str(a), str(b)]).thresholds == [a, b]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--max-batch-size", "0"], ["max_batch_size", "greater than or equal to 1"]),
        (["--device", "tpu"], ["device", "tpu"]),
        (["--dtype", "int8"], ["dtype"]),
        (["--thresholds", "/nonexistent/t.json"], ["/nonexistent/t.json", "does not exist"]),
    ],
)
def test_bad_settings_exit_2_with_a_message(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cats-serve: invalid settings")
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_readme_documents_every_setting():
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in text, name
        assert f"`CATS_{name.upper()}`" in text, name


def test_help_shows_each_flags_default_and_environment_variable():
    from cats_serve.server.cli import build_parser

    for action in build_parser()._actions:
        name = action.dest
        if name in ("help", "clear_cache"):
            continue
        assert f"env CATS_{name.upper()})" in action.help, name
        assert "(default: " in action.help, name


@pytest.mark.parametrize("module", ["calibrate", "evaluate"])
def test_calibration_help_shows_defaults(module):
    import importlib

    cli = importlib.import_module(f"cats_serve.calibration.cli.{module}")
    text = " ".join(cli.build_parser().format_help().split())  # argparse wraps lines
    assert "(default: float32)" in text and "(default: auto)" in text


def test_cpu_threads_default_leaves_a_cpu_to_the_http_server(monkeypatch):
    from cats_serve.server.api.serving import cpu_threads

    assert cpu_threads(Settings(cpu_threads=3)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cpu_threads(Settings()) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert cpu_threads(Settings()) == 1

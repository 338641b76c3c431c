"""The ``paadet`` command dispatcher: commands listed, bad flags, a command whose optional package is missing."""

from __future__ import annotations

import importlib

import pytest

from paadet import cli


def test_every_command_is_registered(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_flag_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--output", "x.onnx", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_missing_optional_package_breaks_only_its_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_import = importlib.import_module

    def fake_import(name: str, *args, **kwargs):
        if name == "paadet.commands.eval":
            raise ModuleNotFoundError("No module named 'pycocotools'", name="pycocotools")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["eval", "--data", "coco", "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pycocotools" in err and "paadet eval" in err
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--iters", "1"])  # the other commands still work
    assert args.iters == 1

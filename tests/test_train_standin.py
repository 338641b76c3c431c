"""tools/train_standin.py --quick: every step of the stand-in's script (data, training, export, evaluation)
on a tiny set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_the_standin_and_its_evaluation(tmp_path):
    out = tmp_path / "standin"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_standin.py"), "--output-dir", str(out), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "standin.json").read_text())
    assert summary["recipe"]["optimizer"] == "adamw" and summary["recipe"]["scale"] == "160x160"
    assert isinstance(summary["ap"], float) and 0.0 <= summary["ap"] <= 1.0
    ckpt = torch.load(out / "standin.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}  # weights and meta only, no optimiser state
    settings = ckpt["meta"]["settings"]
    assert (settings["optimizer"], settings["lr"], settings["weight_decay"]) == ("adamw", 0.0003, 0.05)
    assert ckpt["meta"]["dataset_meta"]["classes"] == summary["classes"]
    assert len(list((out / "val" / "images").glob("*.jpg"))) == summary["recipe"]["val_images"]
    assert "--optimizer adamw" in summary["train_command"]


def test_the_20_minute_recipe_trains_on_its_own_easier_data_in_float32(tmp_path):
    out = tmp_path / "quick"
    script = [sys.executable, str(ROOT / "tools" / "train_standin.py"), "--output-dir", str(out)]
    proc = subprocess.run([*script, "--minutes", "20", "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "standin.json").read_text())
    assert summary["recipe"]["scale"] == "128x128" and summary["classes"] == ["circle"]
    coco = json.loads((out / "val" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == summary["classes"] and coco["images"][0]["width"] == 128
    ckpt = torch.load(out / "standin.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["dataset_meta"]["classes"] == summary["classes"]
    assert "--amp" not in summary["train_command"] and "--lr 0.0003" in summary["train_command"]
    assert summary["times"]["train_cpu_s"] > 0 and summary["times"]["train_s"] > 0
    # every command it runs is printed, and the AP with 3 decimals
    assert "$ " + summary["train_command"] in proc.stdout
    assert f"stand-in: AP {summary['ap']:.3f} on" in proc.stdout

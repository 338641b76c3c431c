"""The trainer on a tiny generated set (64 x 80 images, CPU): loss goes down, resume is bit-exact,
bad losses stop it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest
import torch

from paadet.data.synthetic import synthetic_image
from paadet.train import TrainConfig, TrainingError, train
from paadet.train import loss as loss_module
from paadet.train.checkpointer import read_checkpoint
from paadet.train.hooks import TrainHook
from paadet.train.init import build_train_model, cls_bias_init
from paadet.train.metrics import read_rows
from paadet.train.plots import plot_metrics

HEIGHT, WIDTH = 64, 80


def write_tiny_set(folder: Path, num_images: int, file_names: list[str] | None = None) -> tuple[Path, Path]:
    """``num_images`` generated 64 x 80 images with two boxes each (categories 5 'cat_a', 9 'cat_b')."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = file_names or [f"im{i}.png" for i in range(num_images)]
    images, anns = [], []
    for i, name in enumerate(names):
        if not (image_dir / name).exists():
            cv2.imwrite(str(image_dir / name), synthetic_image(HEIGHT, WIDTH, seed=i))
        images.append({"id": i + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
        for j, (cat, box) in enumerate(((5, [6 + 4 * i, 5, 30, 26]), (9, [40, 28 - 3 * i, 32, 30]))):
            anns.append(
                {
                    "id": 2 * i + j + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    ann = folder / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": 5, "name": "cat_a"}, {"id": 9, "name": "cat_b"}],
            }
        )
    )
    return ann, image_dir


def tiny_config(ann: Path, image_dir: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        ann_file=ann,
        image_dir=image_dir,
        output_dir=out,
        init="scratch",
        scale=(WIDTH, HEIGHT),
        batch_size=1,
        epochs=2,
        warmup_iters=2,
        lr=0.002,
        lr_steps=(1,),
        workers=1,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def final_state(out: Path) -> dict:
    return read_checkpoint(out / "latest.pth")


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights and SGD momentum bit for bit, and the same per-iteration losses and files."""
    ca, cb = final_state(a), final_state(b)
    assert (ca["meta"]["iter"], ca["meta"]["epoch"]) == (cb["meta"]["iter"], cb["meta"]["epoch"])
    different = [k for k, v in ca["state_dict"].items() if not torch.equal(v, cb["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=False):
        assert sa.keys() == sb.keys()
        for key in sa:  # SGD's momentum_buffer; AdamW's step, exp_avg, exp_avg_sq
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    keys = ("iter", "epoch", "lr", "loss", "loss_cls", "loss_bbox", "loss_iou", "num_pos", "files")
    rows_a = [{k: r[k] for k in keys} for r in read_rows(a / "metrics.jsonl")]
    rows_b = [{k: r[k] for k in keys} for r in read_rows(b / "metrics.jsonl")]
    assert rows_a == rows_b


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_set(tmp_path_factory.mktemp("tiny"), num_images=2)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run: 2 images, batch 1, 2 epochs (4 iterations), shuffled, flips at 0.5."""
    out = tmp_path_factory.mktemp("reference")

    class PlotSeen(TrainHook):  # metrics.png is rewritten after every epoch, not only at the end
        def __init__(self) -> None:
            self.seen: list[int] = []

        def after_epoch(self, trainer) -> None:
            plot = trainer.out / "metrics.png"
            self.seen.append(plot.stat().st_mtime_ns if plot.is_file() else 0)

    hook = PlotSeen()
    summary = train(tiny_config(*dataset, out), hooks=[hook])
    assert summary.iterations == 4 and summary.epochs == 2 and summary.stopped == "finished"
    assert len(hook.seen) == 2 and 0 < hook.seen[0] <= hook.seen[1], hook.seen
    return out


def test_reference_run_outputs(reference):
    rows = read_rows(reference / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2]
    # warm-up over 2 iterations from 0.001x, then x0.1 after epoch 1
    assert [r["lr"] for r in rows] == pytest.approx([2e-6, 2e-3, 2e-4, 2e-4], rel=1e-12)
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss_cls"] + row["loss_bbox"] + row["loss_iou"], rel=1e-6)
        assert row["num_pos"] > 0 and len(row["files"]) == 1 and row["time"] > 0
    assert sorted(r["files"][0] for r in rows[:2]) == ["im0.png", "im1.png"]
    names = sorted(os.listdir(reference))
    assert {"epoch_1.pth", "epoch_2.pth", "latest.pth", "metrics.jsonl"} <= set(names)
    # epoch_N.pth: the weights and meta only; latest.pth: what resume needs too (same weights)
    epoch_2 = torch.load(reference / "epoch_2.pth", weights_only=True)
    latest = torch.load(reference / "latest.pth", weights_only=True)
    assert set(epoch_2) == {"meta", "state_dict"} and {"optimizer", "scheduler", "rng"} <= set(latest)
    assert epoch_2["meta"] == latest["meta"]
    assert all(torch.equal(epoch_2["state_dict"][k], v) for k, v in latest["state_dict"].items())
    assert (reference / "epoch_2.pth").stat().st_size < (reference / "latest.pth").stat().st_size
    assert (reference / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: a test extra
    meta = final_state(reference)["meta"]
    assert meta["dataset_meta"] == {"classes": ["cat_a", "cat_b"], "category_ids": [5, 9]}
    assert meta["settings"]["lr_steps"] == [1] and meta["init"]["mode"] == "scratch"


def test_resume_after_max_iters_is_bit_identical(dataset, reference, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(*dataset, out, max_iters=1))
    assert (first.iterations, first.stopped) == (1, "max_iters")
    assert read_checkpoint(out / "latest.pth")["meta"]["train_state"]["batch_in_epoch"] == 1
    last = train(tiny_config(*dataset, out, resume=True))  # mid-epoch 1, across its end, through epoch 2
    assert (last.iterations, last.run_iterations, last.stopped) == (4, 3, "finished")
    assert_same_run(reference, out)
    again = train(tiny_config(*dataset, out, resume=True))
    assert again.stopped == "nothing to do" and again.run_iterations == 0


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from paadet.train import TrainConfig, train
    ann, images, out = sys.argv[1:4]
    train(TrainConfig(ann_file=ann, image_dir=images, output_dir=out, init="scratch", scale=({w}, {h}), batch_size=1,
                      epochs=2, warmup_iters=2, lr=0.002, lr_steps=(1,), workers=1, progress=False,
                      save_interval_iters=1, threads={threads}))
""")


def test_sigkill_then_resume_is_bit_identical(dataset, reference, tmp_path):
    out = tmp_path / "killed"
    code = CHILD.format(w=WIDTH, h=HEIGHT, threads=torch.get_num_threads())
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(dataset[0]), str(dataset[1]), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while not (out / "latest.pth").exists():  # written atomically after iteration 1
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child wrote no checkpoint"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    done_before = read_checkpoint(out / "latest.pth")["meta"]["iter"]
    assert 1 <= done_before < 4
    resumed = train(tiny_config(*dataset, out, resume=True))
    assert resumed.iterations == 4 and resumed.run_iterations == 4 - done_before
    assert_same_run(reference, out)


def test_loss_goes_down_on_a_repeated_batch(tmp_path, capsys):
    ann, images = write_tiny_set(tmp_path / "same", num_images=3, file_names=["one.png"] * 3)
    out = tmp_path / "out"
    summary = train(
        tiny_config(
            ann,
            images,
            out,
            epochs=1,
            warmup_iters=0,
            flip_prob=0.0,
            shuffle=False,
            val_ann=ann,
            val_images=images,
            progress=True,
        )
    )
    bar = capsys.readouterr().err  # the time left is the recent iterations' (paadet.train.eta), not tqdm's
    assert "epoch 1/1" in bar and "left=" in bar and "<" not in bar.split("epoch 1/1")[-1].split("\n")[0]
    rows = read_rows(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and summary.images == 3
    assert losses[-1] < 0.8 * losses[0], losses
    assert min(losses[1:]) < losses[0]
    val = [r for r in rows if "val" in r]  # validated after the (last) epoch with paadet's evaluator
    assert len(val) == 1 and val[0]["epoch"] == 1 and val[0]["val_images"] == 3
    assert -1.0 <= val[0]["val"]["AP"] <= 1.0 and set(val[0]["val"]) >= {"AP", "AP50", "AR100"}
    assert summary.best_ap == val[0]["val"]["AP"] and summary.best_epoch == 1
    assert os.path.samefile(out / "best.pth", out / "epoch_1.pth")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    real_call = loss_module.PAALoss.__call__
    calls = []

    def nan_on_second_call(self, *args):
        out = real_call(self, *args)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loss_module.PAALoss, "__call__", nan_on_second_call)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        train(tiny_config(*dataset, out, shuffle=False, flip_prob=0.0, save_interval_iters=1))
    message = str(info.value)
    assert "iteration 2 (epoch 1" in message and "im1.png" in message and "not finite" in message
    assert str(out / "latest.pth") in message
    assert read_checkpoint(out / "latest.pth")["meta"]["iter"] == 1
    assert [r["iter"] for r in read_rows(out / "metrics.jsonl")] == [1]


def test_diverged_weights_are_not_saved(dataset, tmp_path, monkeypatch):
    real_step = torch.optim.SGD.step
    steps = []

    def poison_second_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            self.param_groups[0]["params"][-1].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", poison_second_step)
    out = tmp_path / "diverged"
    with pytest.raises(TrainingError, match=r"after iteration 2 .*non-finite.*not saved, the last good checkpoint is"):
        train(tiny_config(*dataset, out, save_interval_iters=1))
    latest = read_checkpoint(out / "latest.pth")
    assert latest["meta"]["iter"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in latest["state_dict"].values() if v.is_floating_point())


def test_non_finite_network_outputs_name_the_batch(dataset, tmp_path):
    from paadet.model import PAANet

    torch.manual_seed(0)
    bad = PAANet(num_classes=2).state_dict()
    bad["bbox_head.atss_reg.bias"] = torch.full((4,), float("nan"))
    torch.save(bad, tmp_path / "nan.pth")
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"iteration 1 \(epoch 1.*not finite.*im0.png.*no checkpoint was written"):
        train(tiny_config(*dataset, out, init="checkpoint", init_file=tmp_path / "nan.pth", shuffle=False))
    assert not (out / "latest.pth").exists()


def test_a_finished_folder_needs_resume_and_the_same_settings(dataset, reference):
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(tiny_config(*dataset, reference))
    with pytest.raises(TrainingError, match=r"batch_size 1 -> 2"):
        train(tiny_config(*dataset, reference, resume=True, batch_size=2))


def test_channels_last_follows_the_nchw_run(dataset, reference, tmp_path):
    """--channels-last: the NCHW run's losses and weights to float32 rounding (other kernels, another summation
    order), the trained weights and their momentum kept channels-last, a bit-identical resume in that format,
    and a resume that refuses to switch the format."""
    out = tmp_path / "cl"
    train(tiny_config(*dataset, out, channels_last=True))
    rows, ref_rows = read_rows(out / "metrics.jsonl"), read_rows(reference / "metrics.jsonl")
    assert [r["files"] for r in rows] == [r["files"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows, strict=False):
        for key in ("loss", "loss_cls", "loss_bbox", "loss_iou"):
            assert row[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6), (row["iter"], key)
    ckpt, ref_ckpt = final_state(out), final_state(reference)
    conv = ckpt["state_dict"]["backbone.layer2.0.conv2.weight"]  # trained (layer1 and the stem are frozen)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    buffers = [b["momentum_buffer"] for b in ckpt["optimizer"]["state"].values() if b["momentum_buffer"].dim() == 4]
    assert buffers and all(b.is_contiguous(memory_format=torch.channels_last) for b in buffers)
    assert any(not b.is_contiguous() for b in buffers)
    # the weights' drift from the NCHW run against how far the 4 steps moved them (measured: 0.15 %; PAA's
    # assignment can flip a candidate on a rounding difference, so it is more than rounding alone)
    init = build_train_model(
        2, "scratch", None, seed=0, frozen_stages=1, norm_eval=True, class_names=["cat_a", "cat_b"]
    )[0].state_dict()
    floats = [k for k, v in ref_ckpt["state_dict"].items() if v.is_floating_point()]
    drift = math.sqrt(sum(float((ckpt["state_dict"][k] - ref_ckpt["state_dict"][k]).square().sum()) for k in floats))
    update = math.sqrt(sum(float((ref_ckpt["state_dict"][k] - init[k]).square().sum()) for k in floats))
    assert update > 0 and drift / update < 1e-2
    assert ckpt["meta"]["settings"]["channels_last"] is True
    resumed = tmp_path / "cl_resumed"
    train(tiny_config(*dataset, resumed, channels_last=True, max_iters=2))
    train(tiny_config(*dataset, resumed, channels_last=True, resume=True))
    assert_same_run(out, resumed)
    with pytest.raises(TrainingError, match=r"channels_last True -> False"):
        train(tiny_config(*dataset, out, resume=True, epochs=3, channels_last=False))
    # without the flag a resumed run keeps its own format (here channels-last, although the run is float32)
    train(tiny_config(*dataset, resumed, resume=True, epochs=3))
    assert final_state(resumed)["meta"]["settings"]["channels_last"] is True


def test_the_memory_format_is_decided_before_the_run():
    """channels_last None (the default): NHWC for bf16 autocast on a CPU, NCHW for float32 or CUDA, a resumed
    run's own format (NCHW for checkpoints written before the setting), and an explicit choice as given."""
    base = dict(ann_file="a.json", image_dir="img", output_dir="out", init="scratch")
    assert TrainConfig(**base).channels_last is None
    assert TrainConfig(**base, amp="bf16").resolved().channels_last is True
    assert TrainConfig(**base).resolved().channels_last is False
    assert TrainConfig(**base, amp="bf16", device="cuda").resolved().channels_last is False
    assert TrainConfig(**base, amp="fp16", device="cuda:1").resolved().channels_last is False
    assert TrainConfig(**base, amp="bf16", channels_last=False).resolved().channels_last is False
    assert TrainConfig(**base, channels_last=True).resolved().channels_last is True
    stored_nhwc = {"channels_last": True}
    stored_old = TrainConfig(**base, amp="bf16", channels_last=False).settings()
    del stored_old["channels_last"]  # a checkpoint written before the setting existed
    assert TrainConfig(**base, resume=True).resolved(stored_nhwc).channels_last is True
    assert TrainConfig(**base, amp="bf16", resume=True).resolved(stored_old).channels_last is False
    assert TrainConfig(**base, amp="bf16", resume=True).resolved(stored_old).resume_mismatches(stored_old) == []
    assert TrainConfig(**base, channels_last=False, resume=True).resolved(stored_nhwc).channels_last is False


def test_adamw_runs_resumes_bit_identically_and_is_recorded(dataset, tmp_path):
    """--optimizer adamw: AdamW's state in the checkpoint, a bit-identical resume, no switch on resume."""
    out, resumed = tmp_path / "adamw", tmp_path / "adamw_resumed"
    summary = train(tiny_config(*dataset, out, optimizer="adamw", lr=0.0005, weight_decay=0.05))
    assert summary.iterations == 4
    ckpt = final_state(out)
    assert ckpt["meta"]["settings"]["optimizer"] == "adamw"
    state = next(iter(ckpt["optimizer"]["state"].values()))
    assert {"exp_avg", "exp_avg_sq", "step"} <= state.keys() and float(state["step"]) == 4
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    train(tiny_config(*dataset, resumed, optimizer="adamw", lr=0.0005, weight_decay=0.05, max_iters=2))
    train(tiny_config(*dataset, resumed, optimizer="adamw", lr=0.0005, weight_decay=0.05, resume=True))
    assert_same_run(out, resumed)
    with pytest.raises(TrainingError, match=r"optimizer 'adamw' -> 'sgd'"):
        train(tiny_config(*dataset, out, lr=0.0005, weight_decay=0.05, resume=True, epochs=3))


def test_resume_needs_a_checkpoint(dataset, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(*dataset, tmp_path, resume=True))


def test_initialisation_and_freezing():
    net, report = build_train_model(2, "scratch", seed=3)
    assert report.mode == "scratch" and report.note is None
    head, neck, backbone = net.bbox_head, net.neck, net.backbone
    assert torch.all(head.atss_cls.bias == torch.tensor(cls_bias_init()))
    assert cls_bias_init() == pytest.approx(-4.59512, abs=1e-5)
    for conv in (head.cls_convs[0].conv, head.atss_reg, head.atss_centerness):
        assert abs(float(conv.weight.detach().std()) - 0.01) < 0.002
    assert torch.all(head.atss_reg.bias == 0) and all(float(s.scale.detach()) == 1.0 for s in head.scales)
    lateral = neck.lateral_convs[0].conv.weight  # Xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert float(lateral.detach().abs().max()) <= math.sqrt(6 / (512 + 256)) and torch.all(
        neck.lateral_convs[0].conv.bias == 0
    )
    conv1 = backbone.layer2[0].conv2.weight  # Kaiming normal, fan_out: std sqrt(2 / (128 * 9))
    assert float(conv1.detach().std()) == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
    assert torch.all(backbone.layer2[0].bn3.weight == 0) and torch.all(backbone.layer2[0].bn1.weight == 1)
    again, _ = build_train_model(2, "scratch", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=False))

    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in net.named_parameters() if n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1."))
    }
    net.train()
    assert net.training and net.bbox_head.training and net.backbone.layer2.training
    assert not net.backbone.layer1.training and not net.backbone.bn1.training
    assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_train, _ = build_train_model(2, "scratch", norm_eval=False)
    bn_train.train()
    assert bn_train.backbone.layer2[0].bn1.training and not bn_train.backbone.layer1[0].bn1.training
    assert len(net.state_dict()) == 369


def test_torchvision_backbone_loads_strictly(tmp_path):
    from paadet.checkpoint import CheckpointError
    from paadet.model import PAANet

    torch.manual_seed(1)
    torchvision_like = PAANet().backbone.state_dict()
    torchvision_like.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(torchvision_like, tmp_path / "resnet50.pth")
    net, report = build_train_model(2, "backbone", tmp_path / "resnet50.pth")
    assert report.mode == "backbone"
    assert torch.equal(net.backbone.layer3[2].conv2.weight, torchvision_like["layer3.2.conv2.weight"])
    assert torch.all(net.bbox_head.atss_cls.bias == torch.tensor(cls_bias_init()))
    del torchvision_like["layer4.2.bn3.running_var"]
    torch.save(torchvision_like, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth: not torchvision's ResNet-50.*missing keys: 1"):
        build_train_model(2, "backbone", tmp_path / "broken.pth")


def test_plot_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    rows = [{"iter": 1, "epoch": 1, "lr": 0.1, "loss": 1.0, "loss_cls": 0.5, "loss_bbox": 0.3, "loss_iou": 0.2}]
    assert plot_metrics(rows, tmp_path / "a.png") == tmp_path / "a.png"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert plot_metrics(rows, tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


def test_same_count_other_names_keeps_the_classifier_and_says_so(tmp_path):
    from paadet.model import PAANet

    torch.manual_seed(2)
    state = PAANet(num_classes=2).state_dict()
    torch.save({"meta": {"dataset_meta": {"classes": ["x", "cat_b"]}}, "state_dict": state}, tmp_path / "two.pth")
    net, report = build_train_model(2, "checkpoint", tmp_path / "two.pth", class_names=("cat_a", "cat_b"))
    assert torch.equal(net.bbox_head.atss_cls.weight, state["bbox_head.atss_cls.weight"])
    assert "2 classes like the dataset, under other names ('x' -> 'cat_a')" in report.note
    _, same = build_train_model(2, "checkpoint", tmp_path / "two.pth", class_names=("x", "cat_b"))
    assert same.note is None

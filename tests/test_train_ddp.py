"""``paadet train`` under torchrun with 2 CPU processes (gloo): DDP equals averaged gradients, a killed rank resumes.

The fixture (:func:`tests/fixtures.py:write_train_fixture`: 7 usable images, padded to 8) at 128x96 with
batch 2 per process gives 2 batches per epoch and rank. Two images are made unreadable: they are epoch
1's first batch on rank 0, so that step is skipped on both ranks; 2 epochs are 3 iterations. The runs that
need to reach inside (dump each rank's weights, kill a rank) go through ``tests/train_with_hooks.py``, which
passes :class:`paadet.train.TrainHook` s to :func:`paadet.train.train`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed
from fixtures import write_train_fixture

from paadet.cli import main
from paadet.train.checkpointer import read_checkpoint
from paadet.train.dataset import CocoTrainDataset
from paadet.train.ddp import DistEnv, Distributed
from paadet.train.init import build_train_model, trainable_parameters
from paadet.train.loader import build_train_loader
from paadet.train.loss import PAALoss
from paadet.train.metrics import read_rows
from paadet.train.schedule import LRSchedule, set_lr

SCALE, BATCH, EPOCHS, LR, WORLD = (128, 96), 2, 2, 0.01, 2
ITERS = 3  # 2 epochs x ceil(ceil(7 / 2) / 2) batches, less the step no rank runs
UNREADABLE = ("img_h.png", "img_c.png")
HOOKED = Path(__file__).with_name(
    "train_with_hooks.py"
)  # rank 0's first batch of epoch 1 (and single images of epoch 2's)


def train_args(ann: str, images: str, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--ann",
        ann,
        "--images",
        images,
        "--from-scratch",
        "--scale",
        f"{SCALE[0]}x{SCALE[1]}",
        "--batch-size",
        str(BATCH),
        "--epochs",
        str(EPOCHS),
        "--warmup-iters",
        "0",
        "--lr",
        str(LR),
        "--lr-steps",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def torchrun(args: list[str], hooks: list[str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m paadet ARGS`` (1 thread per process);
    with ``hooks`` (flags of ``tests/train_with_hooks.py``), that script instead of ``-m paadet``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1")
    program = ["-m", "paadet"] if hooks is None else [str(HOOKED), *hooks, "--"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        *program,
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fixture_set(tmp_path_factory) -> tuple[str, str]:
    ann, images = write_train_fixture(tmp_path_factory.mktemp("ddp_fixture"))
    for name in UNREADABLE:
        (Path(images) / name).write_bytes(b"not an image")
    return ann, images


@pytest.fixture(scope="module")
def ddp_run(fixture_set, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-process run of 3 iterations (its folder and stderr); each rank dumps its weights."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(train_args(*fixture_set, out), ["--dump-weights", str(out.parent / "dumps")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"finished: {ITERS} iterations, 2 epochs on 2 processes" in done.stdout
    assert done.stdout.count("finished:") == 1  # rank 0 alone prints
    return out, done.stderr


def averaged_gradient_weights(ann: str, images: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The initial weights and those after :data:`ITERS` SGD steps on the mean of the two ranks' gradients,
    computed in this process from each rank's batches (``build_train_loader(rank=r, world_size=2)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = CocoTrainDataset(ann, images, scale=SCALE, flip_prob=0.5, seed=0)
        net, _ = build_train_model(
            len(dataset.classes), "scratch", seed=0, class_names=tuple(map(str, dataset.classes))
        )
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        params = trainable_parameters(net)
        optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)
        schedule, loss_fn, iteration = LRSchedule(LR, 0, 0.001, (1,)), PAALoss(), 0
        for epoch in range(EPOCHS):
            net.train()
            loaders = [
                build_train_loader(dataset, batch_size=BATCH, seed=0, epoch=epoch, workers=0, rank=r, world_size=WORLD)
                for r in range(WORLD)
            ]
            for batches in zip(*loaders, strict=False):
                if any(len(batch) == 0 for batch in batches):
                    continue  # a rank without a readable image: no rank steps
                set_lr(optimizer, schedule.lr_at(iteration, epoch))
                grads = []
                for batch in batches:
                    optimizer.zero_grad(set_to_none=True)
                    out = loss_fn(
                        *net(batch.images), list(batch.gt_boxes), list(batch.gt_labels), list(batch.pad_shapes)
                    )
                    out.loss.backward()
                    grads.append([p.grad.clone() for p in params])
                for p, *per_rank in zip(params, *grads, strict=False):
                    p.grad = sum(g / WORLD for g in per_rank)
                optimizer.step()
                iteration += 1
        assert iteration == ITERS
        return initial, {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def test_ranks_agree_and_equal_the_averaged_gradient_steps(fixture_set, ddp_run):
    ddp_run, stderr = ddp_run
    dumps = ddp_run.parent / "dumps"
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    ckpt = read_checkpoint(ddp_run / "latest.pth")
    assert ckpt["meta"]["iter"] == ITERS and ckpt["meta"]["settings"]["world_size"] == WORLD
    assert list(ckpt["state_dict"]) == list(rank0)  # the unwrapped module's (mmdetection's) key names
    assert not any(k.startswith("module.") for k in rank0)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks differ in {name}"
        assert torch.equal(value, ckpt["state_dict"][name]), f"checkpoint differs from rank 0 in {name}"
    initial, expected = averaged_gradient_weights(*fixture_set)
    moved = 0
    for name, want in expected.items():
        delta_ref, delta_ddp = want - initial[name], rank0[name] - initial[name]
        scale = float(delta_ref.abs().max())
        if scale > 0:
            moved += 1
            assert float((delta_ddp - delta_ref).abs().max()) <= 1e-5 * scale + 1e-9, name
        else:
            assert torch.equal(rank0[name], want), name
    assert moved > 100  # every trainable tensor moved: the comparison is of real updates
    rows = [r for r in read_rows(ddp_run / "metrics.jsonl") if "loss" in r]
    assert [r["iter"] for r in rows] == list(range(1, ITERS + 1))
    assert [(r["epoch"], r["batch"]) for r in rows] == [(1, 2), (2, 1), (2, 2)]
    assert "warning: iteration 1 (epoch 1, batch 1) skipped on every rank" in stderr
    assert "warning: skipped unreadable image img_h.png" in stderr  # rank 0's own warning
    assert "[rank 1] warning: skipped unreadable image img_c.png" in stderr
    assert all(len(r["files"]) <= BATCH and r["num_pos"] >= sum(r["num_pos_per_image"]) for r in rows)


def test_killed_rank_fails_the_run_and_resume_finishes_it(fixture_set, ddp_run, tmp_path, capsys):
    ddp_run, _ = ddp_run
    out = tmp_path / "run"
    start = time.monotonic()
    killed = torchrun(train_args(*fixture_set, out), ["--kill-at", "1:2"], timeout=120)
    assert killed.returncode != 0 and time.monotonic() - start < 120
    assert "SIGKILL" in killed.stderr
    assert read_checkpoint(out / "latest.pth")["meta"]["iter"] == 1  # epoch 1's; iteration 2 was lost
    # resuming with another world size is refused in one line, before any work
    assert main(train_args(*fixture_set, out, "--resume")) != 0
    assert "world_size 2 -> 1" in capsys.readouterr().err
    # the --nproc shortcut (torchrun's launcher) continues it, to the uninterrupted run's weights bit for bit
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    resumed = subprocess.run(
        [sys.executable, "-m", "paadet", *train_args(*fixture_set, out, "--resume", "--nproc", "2")],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished: 3 iterations, 2 epochs on 2 processes; this run 2 iterations on 6 images" in resumed.stdout
    final, reference = read_checkpoint(out / "latest.pth"), read_checkpoint(ddp_run / "latest.pth")
    assert final["meta"]["iter"] == ITERS
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    keys = ("iter", "epoch", "lr", "loss", "num_pos", "files")
    assert [{k: r[k] for k in keys} for r in read_rows(out / "metrics.jsonl")] == [
        {k: r[k] for k in keys} for r in read_rows(ddp_run / "metrics.jsonl")
    ]


def test_environment_and_single_process_agreement():
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()  # the CPU runs' backend
    assert DistEnv.from_env({}) == DistEnv()
    assert DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(Exception, match="inconsistent torchrun environment"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    one = Distributed(DistEnv(), torch.device("cpu"), None)
    agreed = one.agree_losses((1.0, 0.5, 0.25, 0.25), 7, 2)
    assert agreed.finite and agreed.losses == (1.0, 0.5, 0.25, 0.25) and (agreed.num_pos, agreed.images) == (7, 2)
    assert not one.agree_losses((float("nan"), 0.0, 0.0, 0.0), 0, 1).finite
    assert one.agree_step(False, True, False) == (False, True, False)
    assert one.agree_step(True, False, False) == (True, False, False)
    assert one.agree_step(True, True, True) == (True, True, True)

"""Write mmdetection 3.3's training losses for PAA on the paadet training fixture (the training golden file).

Run it in the reference environment (mmdetection 3.3 + scikit-learn, see ../shared/wheels/README.md and
docs/parity.md), with paadet importable there (``pip install --no-deps -e .``):

    /tmp/mmref/bin/python tools/make_train_golden.py --out tests/golden/mmdet_train_golden.json \
        --debug-dir ../plan/golden_debug

mmdetection's own config ``configs/paa/paa_r50_fpn_1x_coco.py`` is loaded and changed only where the
golden file needs it: 3 classes (the fixture's, from ``tests/fixtures.py:write_train_fixture``), the
fixture as the training set, ``RandomFlip`` probability 0, no shuffling, no pretrained backbone (the
seeded weights of ``paadet.model.seeded.train_state_dict`` are loaded, strict), and 0 loader workers.
mmdetection's own training dataloader (dataset, filter, pipeline, ``DefaultSampler``,
``AspectRatioBatchSampler``, ``pseudo_collate``), ``DetDataPreprocessor(training=True)`` and
``model.loss`` run on the CPU with the model in train mode (BatchNorm stays in eval mode: norm_eval).
The runs (``RUNS``): the config's own Resize scale (1333, 800) with batch size 1, then a small scale
(400, 256) that keeps the replaying test cheap, each weight set with batch size 1 (one record per
image) and 2 (mmdetection's aspect-ratio batches). With ``--depth 101`` the config is
``configs/paa/paa_r101_fpn_1x_coco.py`` (the same with a ResNet-101) and the runs are ``RUNS_R101``, the small
scale only (``tests/golden/mmdet_train_golden_r101.json``):

    /tmp/mmref/bin/python tools/make_train_golden.py --depth 101 --out tests/golden/mmdet_train_golden_r101.json

The head's ``get_targets``, ``get_pos_loss`` and ``paa_reassign`` and
sklearn's ``GaussianMixture`` are wrapped (not changed) to record the number of positives and, with
``--debug-dir``, intermediate tensors (described in the README.md written there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import cv2
import mmcv
import mmdet
import mmdet.models.dense_heads.paa_head as paa_head_module
import mmengine
import numpy as np
import sklearn
import sklearn.mixture
import torch
from fixtures import TRAIN_FIXTURE_CATEGORIES, TRAIN_GOLDEN_WEIGHTS, train_fixture_annotations, write_train_fixture
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import Runner

from paadet.model.seeded import train_state_dict

FIXTURE_SEED = 0
FULL_SCALE, SMALL_SCALE = (1333, 800), (400, 256)
# (name, weights, Resize scale, batch size): the config's own scale once (batch size 1); the rest at a small
# scale so that the test that replays them stays cheap on a CPU.
RUNS = (
    ("prior_full_b1", "prior", FULL_SCALE, 1),
    ("prior_small_b1", "prior", SMALL_SCALE, 1),
    ("prior_small_b2", "prior", SMALL_SCALE, 2),
    ("hot_small_b1", "hot", SMALL_SCALE, 1),
    ("hot_small_b2", "hot", SMALL_SCALE, 2),
)
RUNS_R101 = (
    ("prior_small_b1", "prior", SMALL_SCALE, 1),
    ("hot_small_b2", "hot", SMALL_SCALE, 2),
)
"""The R-101 runs: the small scale only, one record per image and the aspect-ratio batches (the network is twice
R-50's cost, and the loss code after it is the same)."""


def config_path(depth: int) -> str:
    """mmdetection's own PAA 1x config of the backbone depth."""
    return os.path.join(os.path.dirname(mmdet.__file__), f".mim/configs/paa/paa_r{depth}_fpn_1x_coco.py")


DEBUG_README = """\
# Debug dumps of tools/make_train_golden.py (mmdetection 3.3 PAA training losses)

Written by `/tmp/mmref/bin/python tools/make_train_golden.py --out tests/golden/mmdet_train_golden.json
--debug-dir ../plan/golden_debug` (from /work/main). One `.npz` per weight set and loader batch:
`{run}_{k:02d}.npz`, where `run` is a run's name in `tests/golden/mmdet_train_golden.json` (`runs[...].name`:
weights `prior`/`hot`, Resize scale `full` (1333, 800) or `small` (400, 256), batch size `b1`/`b2`) and `k`
the batch's position in mmdetection's loader order (its images: `runs[...].batches[k].file_names`).
With batch size 1, `k` is the image's index in the kept dataset. Load with `np.load(path)`.

Keys prefixed `i{j}_` belong to image `j` of the batch (always `i0_` with batch size 1). `A` is the
number of anchors of the batch-padded feature maps (the same for every image of a batch), `C` = 3
classes, `P` the pre-assigned positives of the image, `L` = 5 levels. Anchors are in mmdetection's order:
levels P3..P7 concatenated, row-major (y, then x) within a level. Float tensors are float32 unless
noted; label 3 (= C) means background.

Batch-wide:
- `input`: float32 [B, 3, H, W], the data preprocessor's output (normalised RGB, zero padded); only
  in the `prior_*_b1` files (it does not depend on the weights).
- `cls_l{l}`, `reg_l{l}`, `iou_l{l}` (l = 0..4): the raw head outputs per level, [B, C, h, w],
  [B, 4, h, w] (already multiplied by the level's Scale) and [B, 1, h, w].
- `anchors`: [A, 4] xyxy anchors (the same for every image).
- `losses`: [3] float64: loss_cls, loss_bbox, loss_iou of the batch (as in the JSON).

Per image `j`:
- `i{j}_valid`: bool [A], the anchors' valid flags from this image's own pad_shape.
- `i{j}_gt_boxes` [M, 4] (network frame), `i{j}_gt_labels` int64 [M]; `i{j}_ignored_boxes` [K, 4]
  (crowd boxes; unused by PAA); `i{j}_img_shape`, `i{j}_pad_shape`, `i{j}_batch_input_shape` int64 [2]
  (h, w).
- `i{j}_labels_pre` int64 [A]: get_targets labels before PAA (MaxIoUAssigner; 3 = background and
  invalid anchors); `i{j}_label_weights_pre` [A] (1 for valid anchors, 0 for invalid ones).
- `i{j}_pos_inds` int64 [P]: indices of the pre-assigned positives (ascending);
  `i{j}_pos_gt_inds` int64 [P]: their GT index (0-based, into `gt_boxes`).
- `i{j}_pos_loss` [P]: get_pos_loss, the PAA score = `i{j}_pos_loss_cls` [P] (focal loss summed over the
  classes) + `i{j}_pos_loss_bbox` [P] (1.3 * (1 - GIoU(decoded box, GT))); `i{j}_pos_decoded` [P, 4],
  the decoded boxes of the candidates.
- GMM, one fit per GT that had >= 2 candidates (in GT order), concatenated; `i{j}_gmm_offsets` int64
  [G + 1] slices the concatenated [N] arrays (fit `g` is `[offsets[g]:offsets[g + 1]]`):
  - `i{j}_gmm_gt` int64 [G]: the GT index of each fit;
  - `i{j}_gmm_cand_inds` int64 [N]: the candidates' anchor indices, sorted ascending by loss (the
    order the GMM sees); `i{j}_gmm_x` [N]: the sorted losses (float32, sklearn's X);
  - `i{j}_gmm_assign` int64 [N] (predict: 0 = component initialised at the min),
    `i{j}_gmm_score` float64 [N] (score_samples);
  - `i{j}_gmm_means`, `i{j}_gmm_vars`, `i{j}_gmm_weights` float64 [G, 2] (after fit; vars include
    reg_covar), `i{j}_gmm_n_iter` int64 [G], `i{j}_gmm_converged` bool [G],
    `i{j}_gmm_lower_bound` float64 [G];
  - `i{j}_gmm_new_pos` int64 [N]: 1 where the candidate is a positive after the separation scheme.
- `i{j}_skipped_gts` int64 [S]: GTs with 0 or 1 candidates (no GMM, no positive), as GT indices.
- JSON only: per image `gmm_positives_per_gt` (positives after reassignment of each fitted GT, in
  `gmm_gts` order) and `num_candidates` (P).
- `i{j}_labels_post` int64 [A], `i{j}_label_weights_post` [A]: labels and weights after paa_reassign
  (what loss_cls uses); `i{j}_num_pos` int64: positives after reassignment.
"""


def fixture_hashes(image_dir: str, file_names: list[str]) -> dict:
    """sha256 of the annotation dict (sorted-key JSON) and of each image's decoded BGR pixels."""
    images = {}
    for name in file_names:
        pixels = cv2.imread(os.path.join(image_dir, name), cv2.IMREAD_COLOR)
        images[name] = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    annotations = json.dumps(train_fixture_annotations(FIXTURE_SEED), sort_keys=True).encode()
    return {"annotations_sha256": hashlib.sha256(annotations).hexdigest(), "pixels_sha256": images}


def build_cfg(ann_file: str, image_dir: str, scale: tuple[int, int], batch_size: int, depth: int = 50) -> Config:
    """mmdetection's PAA config on the fixture: 3 classes, no flip, no shuffle, no pretrained backbone."""
    cfg = Config.fromfile(config_path(depth))
    assert cfg.model.backbone.depth == depth
    cfg.model.bbox_head.num_classes = len(TRAIN_FIXTURE_CATEGORIES)
    cfg.model.backbone.init_cfg = None
    loader = cfg.train_dataloader
    loader.batch_size = batch_size
    loader.num_workers = 0
    loader.persistent_workers = False
    loader.sampler = dict(type="DefaultSampler", shuffle=False)
    dataset = loader.dataset
    dataset.data_root = ""
    dataset.ann_file = ann_file
    dataset.data_prefix = dict(img=image_dir.rstrip("/") + "/")
    dataset.metainfo = dict(classes=tuple(name for _, name in TRAIN_FIXTURE_CATEGORIES))
    flips = [step for step in dataset.pipeline if step["type"] == "RandomFlip"]
    assert len(flips) == 1, "the config's train pipeline has changed"
    flips[0]["prob"] = 0.0
    resizes = [step for step in dataset.pipeline if step["type"] == "Resize"]
    assert len(resizes) == 1 and tuple(resizes[0]["scale"]) == FULL_SCALE, "the config's train pipeline has changed"
    resizes[0]["scale"] = tuple(scale)
    return cfg


class Recorder:
    """Wraps the head's target, pos-loss and reassign steps and sklearn's GMM; collects per image."""

    def __init__(self, head) -> None:
        self.head = head
        self.images: list[dict] = []
        self.batch: dict = {}
        self.gmm_fits: list[dict] = []
        self._wrap()

    def _wrap(self) -> None:
        head, rec = self.head, self
        forward, get_targets = head.forward, head.get_targets
        get_pos_loss, paa_reassign = head.get_pos_loss, head.paa_reassign

        def forward_w(x):
            outs = forward(x)
            for name, level_outs in zip(("cls", "reg", "iou"), outs, strict=False):
                for lvl, t in enumerate(level_outs):
                    rec.batch[f"{name}_l{lvl}"] = t.detach().numpy().copy()
            return outs

        def get_targets_w(
            anchor_list,
            valid_flag_list,
            batch_gt_instances,
            batch_img_metas,
            batch_gt_instances_ignore=None,
            unmap_outputs=True,
        ):
            out = get_targets(
                anchor_list,
                valid_flag_list,
                batch_gt_instances,
                batch_img_metas,
                batch_gt_instances_ignore=batch_gt_instances_ignore,
                unmap_outputs=unmap_outputs,
            )
            labels, label_weights, _, _, pos_inds, pos_gt_inds = out
            rec.batch["anchors"] = torch.cat(anchor_list[0]).numpy().copy()
            for j in range(len(batch_img_metas)):
                gt, meta = batch_gt_instances[j], batch_img_metas[j]
                ignored = batch_gt_instances_ignore[j]
                rec.images.append(
                    {
                        "valid": torch.cat(valid_flag_list[j]).numpy().copy(),
                        "gt_boxes": gt.bboxes.numpy().copy(),
                        "gt_labels": gt.labels.numpy().copy(),
                        "ignored_boxes": (
                            ignored.bboxes.numpy().copy() if ignored is not None else np.zeros((0, 4), np.float32)
                        ),
                        "img_shape": np.array(meta["img_shape"][:2]),
                        "pad_shape": np.array(meta["pad_shape"][:2]),
                        "batch_input_shape": np.array(meta["batch_input_shape"]),
                        "labels_pre": labels[j].numpy().copy(),
                        "label_weights_pre": label_weights[j].numpy().copy(),
                        "pos_inds": pos_inds[j].numpy().copy(),
                        "pos_gt_inds": pos_gt_inds[j].numpy().copy(),
                    }
                )
            rec._pos_calls = 0
            rec._reassign_calls = 0
            return out

        def get_pos_loss_w(anchors, cls_score, bbox_pred, label, label_weight, bbox_target, bbox_weight, pos_inds):
            out = get_pos_loss(anchors, cls_score, bbox_pred, label, label_weight, bbox_target, bbox_weight, pos_inds)
            entry = rec.images[rec._pos_calls]
            rec._pos_calls += 1
            entry["pos_loss"] = out[0].detach().numpy().copy()
            if len(pos_inds):  # the two terms, computed as get_pos_loss computes them
                decoded = head.bbox_coder.decode(torch.cat(anchors, 0)[pos_inds], bbox_pred[pos_inds])
                cls_term = head.loss_cls(
                    cls_score[pos_inds],
                    label[pos_inds],
                    label_weight[pos_inds],
                    avg_factor=1.0,
                    reduction_override="none",
                ).sum(-1)
                box_term = head.loss_bbox(
                    decoded, bbox_target[pos_inds], bbox_weight[pos_inds], avg_factor=1.0, reduction_override="none"
                )
                entry["pos_loss_cls"] = cls_term.detach().numpy().copy()
                entry["pos_loss_bbox"] = box_term.detach().numpy().copy()
                entry["pos_decoded"] = decoded.detach().numpy().copy()
            else:
                entry["pos_loss_cls"] = np.zeros(0, np.float32)
                entry["pos_loss_bbox"] = np.zeros(0, np.float32)
                entry["pos_decoded"] = np.zeros((0, 4), np.float32)
            return out

        def paa_reassign_w(pos_losses, label, label_weight, bbox_weight, pos_inds, pos_gt_inds, anchors):
            rec.gmm_fits = []
            out = paa_reassign(pos_losses, label, label_weight, bbox_weight, pos_inds, pos_gt_inds, anchors)
            entry = rec.images[rec._reassign_calls]
            rec._reassign_calls += 1
            new_label, new_weight, _, num_pos = out
            entry["labels_post"] = new_label.numpy().copy()
            entry["label_weights_post"] = new_weight.numpy().copy()
            entry["num_pos"] = int(num_pos)
            rec._attach_gmm(entry, pos_losses, pos_inds, pos_gt_inds, anchors, new_label)
            return out

        head.forward = forward_w
        head.get_targets = get_targets_w
        head.get_pos_loss = get_pos_loss_w
        head.paa_reassign = paa_reassign_w

        base = sklearn.mixture.GaussianMixture

        class RecordingGMM(base):
            def fit(self, X, y=None):
                result = super().fit(X, y)
                rec.gmm_fits.append(
                    {
                        "x": np.asarray(X, np.float32).reshape(-1).copy(),
                        "means": self.means_.reshape(-1).astype(np.float64),
                        "vars": self.covariances_.reshape(-1).astype(np.float64),
                        "weights": self.weights_.astype(np.float64),
                        "n_iter": int(self.n_iter_),
                        "converged": bool(self.converged_),
                        "lower_bound": float(self.lower_bound_),
                    }
                )
                return result

            def predict(self, X):
                out = super().predict(X)
                rec.gmm_fits[-1]["assign"] = out.astype(np.int64)
                return out

            def score_samples(self, X):
                out = super().score_samples(X)
                rec.gmm_fits[-1]["score"] = out.astype(np.float64)
                return out

        class SkmShim:
            GaussianMixture = RecordingGMM

        paa_head_module.skm = SkmShim

    def start_batch(self) -> None:
        """Forget the previous batch's records."""
        self.images = []
        self.batch = {}

    def _attach_gmm(self, entry, pos_losses, pos_inds, pos_gt_inds, anchors, new_label) -> None:
        """Match the recorded GMM fits to their GTs (the candidate selection of paa_reassign, redone)."""
        fits = self.gmm_fits
        gmm_gt, cand, skipped = [], [], []
        if len(pos_inds):
            sizes = np.cumsum([0] + [a.size(0) for a in anchors])
            for g in range(int(pos_gt_inds.max()) + 1):
                inds, losses = [], []
                for lvl in range(len(anchors)):
                    mask = (pos_inds >= int(sizes[lvl])) & (pos_inds < int(sizes[lvl + 1])) & (pos_gt_inds == g)
                    value, top = pos_losses[mask].topk(min(int(mask.sum()), self.head.topk), largest=False)
                    inds.append(pos_inds[mask][top])
                    losses.append(value)
                inds, losses = torch.cat(inds), torch.cat(losses)
                if len(inds) < 2:
                    skipped.append(g)
                    continue
                losses, order = losses.sort()
                gmm_gt.append(g)
                cand.append((inds[order].numpy(), losses.numpy()))
        num_gt = len(entry["gt_labels"])
        skipped += list(range(int(pos_gt_inds.max()) + 1 if len(pos_inds) else 0, num_gt))
        assert len(gmm_gt) == len(fits), "GMM fits and GTs with >= 2 candidates differ in number"
        for (_, sorted_losses), fit in zip(cand, fits, strict=False):
            assert np.array_equal(sorted_losses, fit["x"]), "a GMM fit does not match its GT's sorted candidates"
        cand = [inds for inds, _ in cand]
        label = new_label.numpy()
        offsets = np.cumsum([0] + [len(f["x"]) for f in fits]).astype(np.int64)

        def cat(key: str, dtype) -> np.ndarray:
            return np.concatenate([f[key] for f in fits]).astype(dtype) if fits else np.zeros(0, dtype)

        def stack(key: str) -> np.ndarray:
            return np.stack([f[key] for f in fits]) if fits else np.zeros((0, 2))

        cand_all = np.concatenate(cand).astype(np.int64) if cand else np.zeros(0, np.int64)
        entry.update(
            {
                "gmm_gt": np.array(gmm_gt, np.int64),
                "gmm_offsets": offsets,
                "gmm_cand_inds": cand_all,
                "gmm_x": cat("x", np.float32),
                "gmm_assign": cat("assign", np.int64),
                "gmm_score": cat("score", np.float64),
                "gmm_means": stack("means"),
                "gmm_vars": stack("vars"),
                "gmm_weights": stack("weights"),
                "gmm_n_iter": np.array([f["n_iter"] for f in fits], np.int64),
                "gmm_converged": np.array([f["converged"] for f in fits], bool),
                "gmm_lower_bound": np.array([f["lower_bound"] for f in fits], np.float64),
                "gmm_new_pos": (label[cand_all] < self.head.num_classes).astype(np.int64)
                if fits
                else np.zeros(0, np.int64),
                "skipped_gts": np.array(sorted(skipped), np.int64),
                "gmm_positives_per_gt": [int((label[c] < self.head.num_classes).sum()) for c in cand],
            }
        )


def run(cfg: Config, state_dict: dict, name: str, debug_dir: Path | None, with_input: bool) -> list[dict]:
    """mmdetection's loader, preprocessor and loss over the whole fixture; one record per batch."""
    model = MODELS.build(cfg.model)
    model.load_state_dict(state_dict, strict=True)
    model.train()
    recorder = Recorder(model.bbox_head)
    loader = Runner.build_dataloader(cfg.train_dataloader.to_dict(), seed=0)
    records = []
    for k, data in enumerate(loader):
        recorder.start_batch()
        with torch.no_grad():
            data = model.data_preprocessor(data, training=True)
            losses = model.loss(data["inputs"], data["data_samples"])
        values = {key: float(losses[key]) for key in ("loss_cls", "loss_bbox", "loss_iou")}
        images = []
        for sample, entry in zip(data["data_samples"], recorder.images, strict=False):
            meta = sample.metainfo
            images.append(
                {
                    "file_name": os.path.relpath(meta["img_path"], cfg.train_dataloader.dataset.data_prefix["img"]),
                    "img_shape": list(meta["img_shape"][:2]),
                    "pad_shape": list(meta["pad_shape"][:2]),
                    "ori_shape": list(meta["ori_shape"][:2]),
                    "scale_factor": [float(v) for v in meta["scale_factor"]],
                    "flip": bool(meta["flip"]),
                    "gt_boxes": entry["gt_boxes"].astype(np.float64).tolist(),
                    "gt_labels": entry["gt_labels"].tolist(),
                    "num_ignored": len(entry["ignored_boxes"]),
                    "num_candidates": len(entry["pos_inds"]),
                    "num_pos": entry["num_pos"],
                    "gmm_gts": entry["gmm_gt"].tolist(),
                    "gmm_positives_per_gt": entry["gmm_positives_per_gt"],
                    "skipped_gts": entry["skipped_gts"].tolist(),
                }
            )
        record = {
            "file_names": [im["file_name"] for im in images],
            **values,
            "num_pos": sum(im["num_pos"] for im in images),
            "batch_input_shape": list(data["data_samples"][0].metainfo["batch_input_shape"]),
            "images": images,
        }
        records.append(record)
        print(
            f"{name} #{k} {record['file_names']}: cls {values['loss_cls']:.6f} "
            f"bbox {values['loss_bbox']:.6f} iou {values['loss_iou']:.6f} num_pos {[im['num_pos'] for im in images]}",
            flush=True,
        )
        if debug_dir is not None:
            arrays = dict(recorder.batch)
            arrays["losses"] = np.array([values["loss_cls"], values["loss_bbox"], values["loss_iou"]], np.float64)
            if with_input:
                arrays["input"] = data["inputs"].numpy()
            for j, entry in enumerate(recorder.images):
                for key, value in entry.items():
                    if key != "gmm_positives_per_gt":
                        arrays[f"i{j}_{key}"] = np.asarray(value)
            np.savez_compressed(debug_dir / f"{name}_{k:02d}.npz", **arrays)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the golden JSON file to write")
    parser.add_argument(
        "--debug-dir", type=Path, default=None, help="also write per-batch .npz dumps and a README.md here"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--depth", type=int, choices=(50, 101), default=50, help="the ResNet depth (101: RUNS_R101) (default: 50)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_all_modules()
    if args.debug_dir is not None:
        args.debug_dir.mkdir(parents=True, exist_ok=True)
        (args.debug_dir / "README.md").write_text(DEBUG_README)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ann_file, image_dir = write_train_fixture(tmp, seed=FIXTURE_SEED)
        annotated = [im["file_name"] for im in json.loads(Path(ann_file).read_text())["images"]]
        hashes = fixture_hashes(image_dir, annotated)
        kept = None
        for name, weights, scale, batch_size in RUNS if args.depth == 50 else RUNS_R101:
            seed, cls_bias = TRAIN_GOLDEN_WEIGHTS[weights]
            state_dict = train_state_dict(
                seed, cls_bias=cls_bias, num_classes=len(TRAIN_FIXTURE_CATEGORIES), depth=args.depth
            )
            cfg = build_cfg(ann_file, image_dir, scale, batch_size, args.depth)
            batches = run(cfg, state_dict, name, args.debug_dir, with_input=batch_size == 1 and weights == "prior")
            runs.append(
                {"name": name, "weights": weights, "scale": list(scale), "batch_size": batch_size, "batches": batches}
            )
            names = [n for b in batches for n in b["file_names"]]
            if batch_size == 1:
                kept = names if kept is None else kept
                assert names == kept, "the kept images changed between runs"
    skipped = [name for name in annotated if name not in kept]
    command = (
        "/tmp/mmref/bin/python tools/make_train_golden.py --out tests/golden/mmdet_train_golden.json "
        "--debug-dir ../plan/golden_debug"
        if args.depth == 50
        else f"/tmp/mmref/bin/python tools/make_train_golden.py --depth {args.depth} "
        f"--out tests/golden/mmdet_train_golden_r{args.depth}.json"
    )
    payload = {
        "generator": "tools/make_train_golden.py",
        "command": command,
        "depth": args.depth,
        "versions": {
            "mmdet": mmdet.__version__,
            "mmcv": mmcv.__version__,
            "mmengine": mmengine.__version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "config": f"mmdet/.mim/configs/paa/paa_r{args.depth}_fpn_1x_coco.py (num_classes 3, RandomFlip prob 0, "
        "DefaultSampler shuffle False, AspectRatioBatchSampler, backbone init_cfg None, Resize scale "
        "per run), CPU, train mode",
        "fixture": {
            "function": "tests/fixtures.py:write_train_fixture",
            "seed": FIXTURE_SEED,
            "classes": [name for _, name in TRAIN_FIXTURE_CATEGORIES],
            "category_ids": [cid for cid, _ in TRAIN_FIXTURE_CATEGORIES],
            **hashes,
        },
        "weights": {
            name: {
                "function": "paadet.model.seeded.train_state_dict",
                "seed": s,
                "cls_bias": b,
                "num_classes": 3,
                **({"depth": args.depth} if args.depth != 50 else {}),
            }
            for name, (s, b) in TRAIN_GOLDEN_WEIGHTS.items()
        },
        "annotated_images": annotated,
        "kept_images": kept,
        "skipped_images": skipped,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(payload, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); kept {kept}; skipped {skipped}", file=sys.stderr)


if __name__ == "__main__":
    main()

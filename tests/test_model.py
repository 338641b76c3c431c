"""PAANet (state-dict names, outputs, eval mode) and PAAPostprocess end to end on tiny random head outputs."""

from __future__ import annotations

import torch

from paadet.model import AnchorGenerator, DeltaXYWHBoxCoder, PAANet, feature_sizes
from paadet.postprocess import PAAPostprocess, PostprocessConfig, select_candidates

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys() -> set[str]:
    """mmdetection's 369 state-dict keys of PAA R50-FPN, written out from the spec."""
    keys = {"backbone.conv1.weight"} | {f"backbone.bn1.{p}" for p in BN}
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            prefix = f"backbone.layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.add(f"{prefix}.conv{i}.weight")
                keys |= {f"{prefix}.bn{i}.{p}" for p in BN}
            if b == 0:
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{p}" for p in BN}
    for i in range(3):
        keys |= {f"neck.lateral_convs.{i}.conv.weight", f"neck.lateral_convs.{i}.conv.bias"}
    for i in range(5):
        keys |= {f"neck.fpn_convs.{i}.conv.weight", f"neck.fpn_convs.{i}.conv.bias"}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(4):
            keys |= {
                f"bbox_head.{tower}.{i}.conv.weight",
                f"bbox_head.{tower}.{i}.gn.weight",
                f"bbox_head.{tower}.{i}.gn.bias",
            }
    for conv in ("atss_cls", "atss_reg", "atss_centerness"):
        keys |= {f"bbox_head.{conv}.weight", f"bbox_head.{conv}.bias"}
    keys |= {f"bbox_head.scales.{i}.scale" for i in range(5)}
    return keys


def test_state_dict_keys_and_shapes():
    sd = PAANet().state_dict()
    assert len(sd) == 369
    assert set(sd) == expected_keys()
    assert sd["backbone.conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["backbone.layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert sd["backbone.layer1.0.downsample.1.running_var"].shape == (256,)
    assert sd["backbone.layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert sd["neck.lateral_convs.0.conv.weight"].shape == (256, 512, 1, 1)
    assert sd["neck.lateral_convs.2.conv.weight"].shape == (256, 2048, 1, 1)
    assert sd["neck.fpn_convs.3.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["neck.fpn_convs.4.conv.bias"].shape == (256,)
    assert sd["bbox_head.cls_convs.3.gn.weight"].shape == (256,)
    assert sd["bbox_head.reg_convs.0.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["bbox_head.atss_cls.weight"].shape == (80, 256, 3, 3)
    assert sd["bbox_head.atss_reg.bias"].shape == (4,)
    assert sd["bbox_head.atss_centerness.weight"].shape == (1, 256, 3, 3)
    for i in range(5):
        assert sd[f"bbox_head.scales.{i}.scale"].shape == ()
    assert not any(k.startswith("backbone.fc") for k in sd)


def test_loads_its_own_state_dict_strictly():
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in PAANet().state_dict().items()}
    model = PAANet()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.state_dict()["bbox_head.scales.2.scale"], sd["bbox_head.scales.2.scale"])


def test_forward_outputs_and_eval_mode():
    torch.manual_seed(0)
    model = PAANet()
    assert not model.training
    model.train()
    assert not any(m.training for m in model.modules())
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model(images)
        alone = model(images[1:])
    assert len(outputs) == 3
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    for out, channels in zip(outputs, (80, 4, 1), strict=False):
        assert len(out) == 5
        assert [tuple(t.shape) for t in out] == [(2, channels, h, w) for h, w in sizes]
        assert all(torch.isfinite(t).all() for t in out)
    # BatchNorm with running statistics and per-sample GroupNorm: an image's outputs do not depend on its batch
    for out, out_alone in zip(outputs, alone, strict=False):
        for level, level_alone in zip(out, out_alone, strict=False):
            torch.testing.assert_close(level[1:], level_alone, rtol=1e-4, atol=1e-4)


def test_num_classes_argument():
    model = PAANet(num_classes=3)
    with torch.no_grad():
        cls_logits, _, _ = model(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in cls_logits] == [3] * 5


# ---------------------------------------------------------------------------------------------------
# PAAPostprocess on tiny random head outputs (padded input 64x96: levels 8x12, 4x6, 2x3, 1x2, 1x1)

PADDED = (64, 96)
IMG_SHAPES = torch.tensor([[60, 90], [50, 96]])  # resized, unpadded (height, width)
SCALE_FACTORS = torch.tensor([[0.5, 0.625], [1.5, 1.25]])  # (w_scale, h_scale): originals 180x96 and 64x40 (w x h)


def head_outputs(batch: int, seed: int, cls_mean: float, num_classes: int = 80):
    gen = torch.Generator().manual_seed(seed)
    sizes = feature_sizes(*PADDED)
    cls = [torch.randn(batch, num_classes, h, w, generator=gen) * 1.5 + cls_mean for h, w in sizes]
    deltas = [torch.randn(batch, 4, h, w, generator=gen) * 2.0 for h, w in sizes]
    iou = [torch.randn(batch, 1, h, w, generator=gen) for h, w in sizes]
    return cls, deltas, iou


def check_detections(dets, batch: int, voted: bool, max_det: int = 100) -> None:
    """Shapes, padding, sorted scores and boxes inside the original image.

    Without voting the bound is exact: x is clamped to ``img_w`` and then divided by ``w_scale``. A voted box is a
    weighted mean of such boxes, which can exceed the bound by float rounding (mmdetection does not clip either).
    """
    assert dets.boxes.shape == (batch, max_det, 4)
    assert dets.scores.shape == (batch, max_det)
    assert dets.labels.shape == (batch, max_det)
    assert dets.labels.dtype == torch.int64
    orig_w = IMG_SHAPES[:batch, 1].float() / SCALE_FACTORS[:batch, 0]
    orig_h = IMG_SHAPES[:batch, 0].float() / SCALE_FACTORS[:batch, 1]
    if voted:
        orig_w, orig_h = orig_w * (1 + 1e-6), orig_h * (1 + 1e-6)
    for i in range(batch):
        n = int(dets.num_dets[i])
        assert torch.all(dets.labels[i, n:] == -1)
        assert torch.all((dets.labels[i, :n] >= 0) & (dets.labels[i, :n] < 80))
        scores = dets.scores[i, :n]
        assert torch.all(scores[:-1] >= scores[1:])
        assert torch.all((scores > 0.05) & (scores <= 1))
        assert torch.all(dets.scores[i, n:] == 0)
        boxes = dets.boxes[i, :n]
        assert torch.all(boxes >= 0)
        assert torch.all(boxes[:, 0::2] <= orig_w[i]) and torch.all(boxes[:, 1::2] <= orig_h[i])
        assert torch.all(boxes[:, 2:] >= boxes[:, :2])


def test_postprocess_shapes_order_and_bounds_few_candidates():
    outputs = head_outputs(2, seed=0, cls_mean=-10.0)
    for voting in (True, False):
        dets = PAAPostprocess(PostprocessConfig(score_voting=voting))(*outputs, IMG_SHAPES, SCALE_FACTORS)
        check_detections(dets, 2, voted=voting)
        assert all(0 < n < 100 for n in dets.num_dets.tolist())


def test_postprocess_saturated_and_boxes_reach_the_image_border():
    post = PAAPostprocess(PostprocessConfig(score_voting=False))
    dets = post(*head_outputs(2, seed=1, cls_mean=-1.0), IMG_SHAPES, SCALE_FACTORS)
    check_detections(dets, 2, voted=False)
    assert dets.num_dets.tolist() == [100, 100]
    # big anchors (side 8 * stride) get clipped: some box edges sit exactly on the original border
    orig_w = IMG_SHAPES[:, 1].float() / SCALE_FACTORS[:, 0]
    assert all(bool((dets.boxes[i, :, 2] == orig_w[i]).any()) for i in range(2))


def test_postprocess_batch_of_two_equals_each_image_alone():
    post = PAAPostprocess()
    cls, deltas, iou = head_outputs(2, seed=2, cls_mean=-4.0)
    batched = post(cls, deltas, iou, IMG_SHAPES, SCALE_FACTORS)
    for i in range(2):
        pick = slice(i, i + 1)
        alone = post(
            [c[pick] for c in cls],
            [d[pick] for d in deltas],
            [u[pick] for u in iou],
            IMG_SHAPES[pick],
            SCALE_FACTORS[pick],
        )
        assert torch.equal(batched.num_dets[pick], alone.num_dets)
        assert torch.equal(batched.labels[pick], alone.labels)
        assert torch.equal(batched.scores[pick], alone.scores)
        torch.testing.assert_close(batched.boxes[pick], alone.boxes, rtol=1e-6, atol=1e-5)


def test_postprocess_accepts_fp16_logits():
    cls, deltas, iou = head_outputs(1, seed=3, cls_mean=-4.0)
    post = PAAPostprocess()
    dets = post(
        [c.half() for c in cls], [d.half() for d in deltas], [u.half() for u in iou], IMG_SHAPES[:1], SCALE_FACTORS[:1]
    )
    assert dets.boxes.dtype == torch.float32
    check_detections(dets, 1, voted=True)


def test_select_candidates_topk_decode_and_rescale_against_reference():
    # nms_pre = 10 < 96 and < 24 anchors on the first two levels: the per-level top-k is exercised
    cls, deltas, iou = head_outputs(2, seed=4, cls_mean=-3.0, num_classes=5)
    anchors = AnchorGenerator()(feature_sizes(*PADDED))
    cand = select_candidates(cls, deltas, iou, anchors, IMG_SHAPES, SCALE_FACTORS, nms_pre=10)
    assert cand.boxes.shape == (2, 10 + 10 + 6 + 2 + 1, 4)
    assert cand.nms_scores.shape == (2, 29, 5)
    for i in range(2):
        ref_boxes, ref_scores = [], []
        for c, d, u, a in zip(cls, deltas, iou, anchors, strict=False):
            s = c[i].reshape(5, -1).T.double().sigmoid()  # [A, C], row-major anchors
            q = u[i].reshape(-1).double().sigmoid()
            dd = d[i].reshape(4, -1).T.double()
            nms = (s * q[:, None]).sqrt()
            idx = nms.max(dim=1).values.argsort(descending=True)[:10] if len(nms) > 10 else torch.arange(len(nms))
            for j in idx.tolist():
                x1, y1, x2, y2 = a[j].double().tolist()
                pw, ph = x2 - x1, y2 - y1
                px, py = x1 + pw / 2, y1 + ph / 2
                dx, dy, dw, dh = (dd[j] * torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64)).tolist()
                dw, dh = (
                    max(-4.135166556742356, min(4.135166556742356, dw)),
                    max(-4.135166556742356, min(4.135166556742356, dh)),
                )
                gx, gy = px + pw * dx, py + ph * dy
                gw, gh = pw * torch.tensor(dw).exp().item(), ph * torch.tensor(dh).exp().item()
                h_img, w_img = IMG_SHAPES[i].tolist()
                box = [
                    min(max(gx - gw / 2, 0), w_img),
                    min(max(gy - gh / 2, 0), h_img),
                    min(max(gx + gw / 2, 0), w_img),
                    min(max(gy + gh / 2, 0), h_img),
                ]
                ws, hs = SCALE_FACTORS[i].double().tolist()
                ref_boxes.append([box[0] / ws, box[1] / hs, box[2] / ws, box[3] / hs])
                ref_scores.append(nms[j].tolist())
        torch.testing.assert_close(
            cand.boxes[i].double(), torch.tensor(ref_boxes, dtype=torch.float64), rtol=1e-5, atol=1e-3
        )
        torch.testing.assert_close(
            cand.nms_scores[i].double(), torch.tensor(ref_scores, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )


def test_default_box_coder_is_papers():
    coder = PAAPostprocess().box_coder
    assert isinstance(coder, DeltaXYWHBoxCoder)
    assert coder.stds == (0.1, 0.1, 0.2, 0.2) and coder.means == (0.0, 0.0, 0.0, 0.0)

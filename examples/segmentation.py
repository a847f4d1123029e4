"""Semantic segmentation with a timm-encoder U-Net, fastcascade.DiceFocalLoss, k-fold CV and TTA.

The task is built from scikit-image's shipped grayscale photographs (no download): each image's
target is the 3-class multi-Otsu quantisation of its intensity (dark / mid / bright: thresholds from
skimage.filters.threshold_multiotsu on all images' pixels pooled, after a light Gaussian blur), and the
input is the image with Gaussian noise added, so the network has to denoise and use context near class
borders. Crops are grouped by source image and
split with fastcascade.kfold_splits (group-aware: no image in both train and val). Class weights come
from the training fold's pixel counts (median-frequency balancing, Eigen & Fergus 2015).

Training uses fastcascade.fit (its loss_fn(model(x), target) with (B, H, W) int64 masks as targets;
the validation confusion matrix counts pixels), then the best checkpoint is scored on the val fold
with fastcascade.segmentation_report, with and without fastcascade.tta_predict (identity, hflip,
vflip, rot90).

    python examples/segmentation.py --quick      # one fold, 64x64 crops, resnet10t, ~15 s on one CPU thread
    python examples/segmentation.py              # 3 folds, 128x128 crops, resnet18
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fastcascade as fc

IMAGES = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock", "horse")
CLASS_NAMES = ("dark", "mid", "bright")


def load_images() -> list[np.ndarray]:
    """The shipped grayscale images (float32 in [0, 1]) that have enough contrast for 3 classes."""
    from skimage import data, util

    out = []
    for name in IMAGES:
        img = getattr(data, name, None)
        if img is None:
            continue
        img = util.img_as_float32(img())
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        out.append(img)
    return out


def make_dataset(images, crop: int, crops_per_image: int, noise: float, seed: int):
    """(inputs (N, 1, crop, crop) float32, masks (N, crop, crop) int64, groups (N,) image ids)."""
    from skimage import filters

    rng = np.random.default_rng(seed)
    smooth = [filters.gaussian(img, sigma=1.0) for img in images]
    # One set of thresholds for all images (per-image ones would make a crop's classes depend on parts
    # of its image the crop does not show).
    thresholds = filters.threshold_multiotsu(np.concatenate([s.ravel() for s in smooth]), classes=3)
    xs, ys, gs = [], [], []
    for gi, img in enumerate(images):
        mask = np.digitize(smooth[gi], thresholds)
        h, w = img.shape
        for _ in range(crops_per_image):
            r, c = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            xs.append(img[r:r + crop, c:c + crop] + noise * rng.standard_normal((crop, crop)))
            ys.append(mask[r:r + crop, c:c + crop])
            gs.append(gi)
    x = torch.from_numpy(np.stack(xs)).float().unsqueeze(1)
    return (x - 0.5) / 0.25, torch.from_numpy(np.stack(ys)).long(), torch.tensor(gs)


class UNet(nn.Module):
    """A timm encoder (features_only) and a light U-Net decoder: at each scale, upsample, concatenate
    the encoder's skip, one conv-BN-ReLU; logits at the input resolution."""

    def __init__(self, encoder: str, num_classes: int, in_chans: int = 1, width: int = 32):
        super().__init__()
        import timm

        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False, in_chans=in_chans)
        chans = self.encoder.feature_info.channels()
        self.lateral = nn.Conv2d(chans[-1], width, 1)
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width + c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                          nn.ReLU(inplace=True)) for c in reversed(chans[:-1]))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        feats = self.encoder(x)
        y = self.lateral(feats[-1])
        for block, skip in zip(self.up, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one fold, 64x64 crops, small encoder, 2 epochs")
    p.add_argument("--encoder", default=None, help="timm model name (default resnet18; --quick: resnet10t)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    crop, per_image = (64, 24) if args.quick else (128, 48)
    encoder = args.encoder or ("resnet10t" if args.quick else "resnet18")
    epochs = args.epochs or (2 if args.quick else 15)
    torch.manual_seed(args.seed)

    x, y, groups = make_dataset(load_images(), crop, per_image, noise=0.1, seed=args.seed)
    K = len(CLASS_NAMES)
    print(f"data: {x.shape[0]} crops {crop}x{crop} from {int(groups.max()) + 1} images, "
          f"pixels per class {fc.pixel_class_counts(y, K).tolist()}")
    splits = fc.kfold_splits(groups, k=args.folds, seed=args.seed)
    results = []
    for fold, (tr, va) in enumerate(splits[:1] if args.quick else splits):
        t0 = time.perf_counter()
        weights = fc.class_weights_from_pixel_counts(fc.pixel_class_counts(y[tr], K, per_image=True),
                                                     "median_frequency")
        model = UNet(encoder, K)
        history, _ = fc.fit(model, fc.DiceFocalLoss(weight=weights, gamma=2.0), TensorDataset(x[tr], y[tr]),
                            TensorDataset(x[va], y[va]), epochs, lr=3e-3, batch_size=16, eval_batch_size=64,
                            num_classes=K, class_names=CLASS_NAMES, monitor="val_loss", progress=False,
                            seed=args.seed, name=f"fold {fold + 1}")
        model.eval()
        with torch.no_grad():
            plain = torch.cat([model(b) for b in x[va].split(64)])
        tta = torch.cat([fc.tta_predict(model, b) for b in x[va].split(64)])
        rep, rep_tta = (fc.segmentation_report(s, y[va], K, class_names=CLASS_NAMES) for s in (plain, tta))
        results.append((rep.miou, rep_tta.miou))
        print(f"fold {fold + 1}: train loss {history[-1]['train_loss']:.4f}, "
              f"{time.perf_counter() - t0:.1f} s, weights {[round(w, 3) for w in weights.tolist()]}")
        print(rep_tta)
        print(f"fold {fold + 1} val mIoU: {rep.miou:.4f}  with TTA: {rep_tta.miou:.4f}")
    miou, miou_tta = np.mean(results, axis=0)
    print(f"mean val mIoU over {len(results)} fold(s): {miou:.4f}  with TTA: {miou_tta:.4f}")


if __name__ == "__main__":
    main()

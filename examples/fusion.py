"""Multimodal event classifier: frozen timm video encoder with fastcascade adapters + log-mel audio CNN +
sensor MLP, concatenated into a fusion MLP, trained with fastcascade.softmax_focal_loss.

Events are generated (no download), 4 classes, each with a class pattern in every modality, in noise
(the audio pattern alone is enough to classify these events; the example shows the plumbing, not a hard task):
  video  (T, 3, S, S): a coloured square moving across a noisy frame; the class sets its direction
         (right, left, down, up) and its tint;
  audio  (sample_rate * seconds,): a tone whose pitch depends on the class (2 classes share a pitch
         band, told apart by amplitude modulation), in white noise;
  sensor (6, L): a 6-axis IMU-like signal; the class sets which axis oscillates and how fast.
The frame encoder is timm efficientnet_b0 (pretrained=False: random frozen weights with BatchNorm
statistics recalibrated on training frames, a stand-in for a pretrained one) with
fastcascade.add_adapters + fastcascade.freeze_backbone: only the adapters train in it. The audio
branch computes torch.stft -> power -> mel filterbank (built here in torch) -> log. Training is a plain
short loop (fastcascade.fit takes one input tensor per sample; this model takes three). Reports macro
F1 (fastcascade.classification_report) on held-out events and per-event inference latency (batch of 1,
median).

    python examples/fusion.py --quick      # small sizes, 4 epochs, ~30 s on one CPU thread
    python examples/fusion.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import fastcascade as fc

CLASS_NAMES = ("right", "left", "down", "up")


def make_events(n: int, frames: int, size: int, sample_rate: int, seconds: float, sensor_len: int,
                generator: torch.Generator):
    """(video (n, T, 3, S, S), audio (n, A), sensor (n, 6, L), labels (n,)), balanced classes."""
    y = torch.arange(n) % 4
    y = y[torch.randperm(n, generator=generator)]
    # Video: a square of side S/4 moving one step per frame in the class's direction.
    video = 0.3 * torch.randn(n, frames, 3, size, size, generator=generator)
    side = max(size // 4, 2)
    step = max((size - side) // max(frames - 1, 1), 1)
    dirs = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])
    start = torch.randint(0, size - side + 1, (n, 2), generator=generator)
    # Colour as well as motion: a frame encoder that pools globally sees little of where the square is.
    colours = 1.5 * torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [1.0, 1.0, 0.2]])
    colours = colours[:, :, None, None]
    for i in range(n):
        d = dirs[y[i]]
        for t in range(frames):
            pos = start[i].clone()
            # Moving along d from the edge it starts at: the trajectory, not the position, shows the class.
            pos[d != 0] = torch.where(d[d != 0] > 0, t * step, size - side - t * step).clamp(0, size - side)
            r, c = pos.tolist()
            video[i, t, :, r:r + side, c:c + side] += colours[y[i]]
    # Audio: tone at 600 Hz (right, left) or 1500 Hz (down, up); left and up are amplitude-modulated at 8 Hz.
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    freq = torch.tensor([600.0, 600.0, 1500.0, 1500.0])[y] * (1 + 0.05 * torch.randn(n, generator=generator))
    modulated = ((y == 1) | (y == 3))[:, None]
    am = torch.where(modulated, 0.5 + 0.5 * torch.sin(2 * math.pi * 8 * t)[None], torch.ones(1, t.numel()))
    audio = am * torch.sin(2 * math.pi * freq[:, None] * t[None])
    audio = audio + 0.8 * torch.randn(n, t.numel(), generator=generator)
    # Sensor: axis = class (of 6), 2 + class cycles over the window, random phase.
    s = torch.arange(sensor_len) / sensor_len
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    sensor = 0.7 * torch.randn(n, 6, sensor_len, generator=generator)
    sensor[torch.arange(n), y] += torch.sin(2 * math.pi * (2 + y[:, None]) * s[None] + phase[:, None])
    return video, audio, sensor, y


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """(n_fft // 2 + 1, n_mels) triangular filters equally spaced on the HTK mel scale."""
    f_max = f_max or sample_rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    pts = torch.linspace(mel(f_min), mel(f_max), n_mels + 2)
    hz = 700.0 * (10 ** (pts / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)[:, None]
    lo, mid, hi = hz[:-2][None], hz[1:-1][None], hz[2:][None]
    return ((bins - lo) / (mid - lo)).clamp(min=0).minimum(((hi - bins) / (hi - mid)).clamp(min=0))


class LogMelCNN(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int = 256, hop: int = 64, n_mels: int = 32, dim: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("mel", mel_filterbank(n_fft, n_mels, sample_rate))
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(32, dim))

    def forward(self, audio):                                          # (B, A)
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        logmel = torch.log(spec.transpose(1, 2) @ self.mel + 1e-6)     # (B, frames, n_mels)
        return self.net(logmel.transpose(1, 2).unsqueeze(1))


class FusionClassifier(nn.Module):
    def __init__(self, frame_encoder: nn.Module, frame_dim: int, sample_rate: int, sensor_shape,
                 num_classes: int = 4, dim: int = 64):
        super().__init__()
        self.frames = frame_encoder
        self.frame_proj = nn.Linear(frame_dim, dim)
        self.audio = LogMelCNN(sample_rate, dim=dim)
        self.sensor = nn.Sequential(nn.Flatten(), nn.Linear(sensor_shape[0] * sensor_shape[1], 128),
                                    nn.ReLU(), nn.Linear(128, dim))
        # The time order of frame features carries the motion: concatenated (not pooled) over T.
        # Each branch's embedding is layer-normalised: no modality dominates the concatenation by scale.
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.fusion = nn.Sequential(nn.Dropout(0.2), nn.LazyLinear(128), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Linear(128, num_classes))

    def forward(self, video, audio, sensor):
        b, t = video.shape[:2]
        f = self.norms[0](self.frame_proj(self.frames(video.flatten(0, 1)))).view(b, -1)
        a, s = self.norms[1](self.audio(audio)), self.norms[2](self.sensor(sensor))
        return self.fusion(torch.cat([f, a, s], 1))


def calibrate_batchnorm(model: nn.Module, frames: torch.Tensor) -> None:
    """Set BatchNorm running statistics from frames (random weights with default statistics, mean 0 and
    variance 1, shrink activations layer after layer to ~1e-6: a frozen encoder would pass no signal)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None     # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in frames.split(64):
            model(batch)
    model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 epochs")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        n_train, n_val, frames, size, epochs = 512, 128, 3, 48, 4
    else:
        n_train, n_val, frames, size, epochs = 1024, 256, 4, 96, 10
    epochs = args.epochs or epochs
    sample_rate, seconds, sensor_len = 8000, 0.5, 64
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = make_events(n_train, frames, size, sample_rate, seconds, sensor_len, gen)
    val = make_events(n_val, frames, size, sample_rate, seconds, sensor_len, gen)

    import timm

    encoder = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    calibrate_batchnorm(encoder, train[0].flatten(0, 1)[:256])
    sites = fc.add_adapters(encoder, bottleneck=16, example_input=torch.randn(1, 3, size, size))
    counts = fc.freeze_backbone(encoder)
    model = FusionClassifier(encoder, encoder.num_features, sample_rate, train[2].shape[1:])
    model(*(m[:2] for m in train[:3]))  # materialise the LazyLinear before building the optimizer
    print(f"frame encoder: efficientnet_b0, adapters at {len(sites)} sites; {counts}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    steps = epochs * math.ceil(n_train / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen)
        total = 0.0
        for idx in order.split(32):
            logits = model(*(m[idx] for m in train[:3]))
            loss = fc.softmax_focal_loss(logits, train[3][idx], gamma=2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        print(f"epoch {epoch + 1}/{epochs}: train focal loss {total / n_train:.4f} "
              f"({time.perf_counter() - t0:.1f} s)")

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(*(m[i:i + 64] for m in val[:3])).argmax(1) for i in range(0, n_val, 64)])
        rep = fc.classification_report(pred, val[3], 4, class_names=CLASS_NAMES)
        lat = []
        for i in range(min(n_val, 20)):
            one = [m[i:i + 1] for m in val[:3]]
            s = time.perf_counter()
            model(*one)
            lat.append((time.perf_counter() - s) * 1e3)
    print(rep)
    print(f"val macro F1: {rep.macro_f1:.4f}")
    print(f"inference latency: {statistics.median(lat[1:]):.2f} ms/event (batch 1, median of {len(lat) - 1}, "
          f"{frames} frames {size}x{size}, {seconds:g} s audio, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

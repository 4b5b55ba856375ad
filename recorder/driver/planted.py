"""The `planted` dataset: offline, CIFAR-shaped images with known label noise and a planted
opposing signal (see docs/DATASETS.md).

Every class is a coloured grating with a class-specific orientation, frequency and hue; each
example jitters those and adds a random phase, background tint and pixel noise, so a small CNN
needs a couple of epochs to learn it. Two kinds of ground truth are planted on top:

- *label noise*: exactly ``round(label_noise * n)`` training labels are flipped to a different
  class (uniformly among the others);
- *an opposing signal* (Rosenfeld & Risteski, 2023): a bright "sky" band across the top of the
  image, with a much larger norm than the class signal, present in ``round(planted_fraction * n)``
  examples split evenly over ``planted_classes``. The feature looks predictive (it only occurs in
  those classes) but pulls towards each of them in turn, so the examples that carry it get large,
  opposing gradients.

Pure numpy, vectorised; the whole array is generated at once (2000 examples in well under 1 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PlantedSplit", "generate_planted", "planted_class_names", "to_uint8", "DISPLAY_SCALE"]

IMAGE_SIZE = 32
CHANNELS = 3
# Display mapping for thumbnails: pixel = 0.5 + DISPLAY_SCALE * x, clipped to [0, 1].
DISPLAY_SCALE = 0.18

_SKY_COLOUR = np.array([-0.4, 0.9, 1.6], dtype=np.float32)  # light blue, in normalised units


@dataclass(frozen=True)
class PlantedSplit:
    """One generated split: images (N, 3, 32, 32) float32 normalised, labels and ground truth."""

    images: np.ndarray
    targets: np.ndarray  # int64, the (possibly flipped) labels the model sees
    clean_target: np.ndarray  # int64
    is_mislabeled: np.ndarray  # bool
    has_planted_feature: np.ndarray  # bool

    def ground_truth(self) -> dict[str, np.ndarray]:
        return {
            "is_mislabeled": self.is_mislabeled,
            "clean_target": self.clean_target,
            "has_planted_feature": self.has_planted_feature,
        }


def planted_class_names(num_classes: int) -> list[str]:
    return [f"class{c}" for c in range(num_classes)]


def _class_params(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orientation, spatial frequency and colour of each class (fixed, independent of seed so
    that train and test share them)."""
    c = np.arange(num_classes)
    theta = np.pi * c / num_classes
    freq = np.array([1.5, 2.5, 3.5])[c % 3]
    # Hues step by 3/num_classes of the wheel, so neighbouring orientations differ in colour.
    hue = 2 * np.pi * ((3 * c) % max(num_classes, 1)) / max(num_classes, 1)
    colour = np.stack([np.cos(hue), np.cos(hue - 2 * np.pi / 3), np.cos(hue + 2 * np.pi / 3)], 1)
    colour = 0.5 + 0.5 * colour  # each channel in [0, 1], none all-dark
    return theta, freq, colour.astype(np.float32)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _choose_planted(clean: np.ndarray, count: int, classes: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Exactly `count` examples, split as evenly as possible over `classes`."""
    mask = np.zeros(clean.shape[0], dtype=bool)
    per_class = np.full(len(classes), count // len(classes))
    per_class[: count % len(classes)] += 1
    for cls, k in zip(classes, per_class):
        members = np.flatnonzero(clean == cls)
        if k > members.size:
            raise ValueError(
                f"planted_fraction asks for {k} planted examples of class {cls}, "
                f"but it has only {members.size}; lower planted_fraction or add planted_classes"
            )
        mask[rng.choice(members, size=k, replace=False)] = True
    return mask


def _flip_labels(clean: np.ndarray, count: int, eligible: np.ndarray, num_classes: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly `count` labels among `eligible` examples, each to a different class."""
    candidates = np.flatnonzero(eligible)
    if count > candidates.size:
        raise ValueError(f"label_noise asks for {count} flipped labels but only "
                         f"{candidates.size} examples are eligible")
    flipped = np.zeros(clean.shape[0], dtype=bool)
    idx = rng.choice(candidates, size=count, replace=False)
    flipped[idx] = True
    targets = clean.copy()
    # An offset in 1..K-1 guarantees a different class, uniformly among the others.
    targets[idx] = (clean[idx] + rng.integers(1, num_classes, size=count)) % num_classes
    return targets, flipped


def _render(clean: np.ndarray, planted: np.ndarray, num_classes: int, noise_std: float,
            planted_strength: float, rng: np.random.Generator) -> np.ndarray:
    n = clean.shape[0]
    theta_c, freq_c, colour_c = _class_params(num_classes)
    theta = theta_c[clean] + rng.normal(0, 0.12, n)  # ~7 degrees of orientation jitter
    freq = freq_c[clean] * (1 + rng.normal(0, 0.08, n))
    phase = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.5, 1.3, n)
    colour = colour_c[clean] + rng.normal(0, 0.15, (n, CHANNELS))
    tint = rng.normal(0, 0.3, (n, CHANNELS))

    coords = np.linspace(-1, 1, IMAGE_SIZE, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    f32 = lambda a: a.astype(np.float32)[:, None, None]
    proj = f32(np.cos(theta)) * xx + f32(np.sin(theta)) * yy
    wave = np.cos(f32(2 * np.pi * freq) * proj + f32(phase))  # (n, H, W)
    grating = (amp[:, None] * (2 * colour - 1)).astype(np.float32)  # signed colour, (n, C)
    images = grating[:, :, None, None] * wave[:, None]
    images += tint[:, :, None, None].astype(np.float32)
    images += noise_std * rng.standard_normal(images.shape, dtype=np.float32)

    if planted.any():
        band = IMAGE_SIZE // 4
        k = int(planted.sum())
        # Sky: bright at the top, fading towards the horizon, with a little texture.
        fade = np.linspace(1.0, 0.7, band, dtype=np.float32)[None, None, :, None]
        sky = planted_strength * _SKY_COLOUR[None, :, None, None] * fade
        sky = sky + 0.1 * rng.standard_normal((k, CHANNELS, band, IMAGE_SIZE), dtype=np.float32)
        images[planted, :, :band, :] = sky
    return images.astype(np.float32, copy=False)


def generate_planted(n: int, *, num_classes: int = 10, label_noise: float = 0.0,
                     planted_fraction: float = 0.1, planted_classes=(0, 1),
                     noise_std: float = 0.6, planted_strength: float = 1.5,
                     seed: int = 0) -> PlantedSplit:
    """Generate one split of `n` examples, deterministically from `seed` (an int or a
    `numpy.random.SeedSequence`).

    Flipped labels are drawn only among examples *without* the planted feature, so the two
    phenomena stay separable when analysing a run.
    """
    if num_classes < 2:
        raise ValueError("planted needs num_classes >= 2")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if not 0.0 <= planted_fraction <= 1.0:
        raise ValueError(f"planted_fraction must be in [0, 1], got {planted_fraction}")
    classes = np.unique(np.asarray(planted_classes, dtype=np.int64))
    if planted_fraction > 0 and (classes.size < 2 or classes.min() < 0
                                 or classes.max() >= num_classes):
        raise ValueError(f"planted_classes must name two or more classes in 0..{num_classes - 1}"
                         f", got {tuple(planted_classes)}")

    rng = np.random.default_rng(seed)
    clean = _balanced_labels(n, num_classes, rng)
    planted = _choose_planted(clean, int(round(planted_fraction * n)), classes, rng)
    targets, flipped = _flip_labels(clean, int(round(label_noise * n)), ~planted,
                                    num_classes, rng)
    images = _render(clean, planted, num_classes, noise_std, planted_strength, rng)
    return PlantedSplit(images=images, targets=targets, clean_target=clean,
                        is_mislabeled=flipped, has_planted_feature=planted)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) normalised float -> (N, H, W, C) uint8 for thumbnails."""
    pixels = np.clip(0.5 + DISPLAY_SCALE * images, 0.0, 1.0)
    return np.round(pixels * 255).astype(np.uint8).transpose(0, 2, 3, 1)

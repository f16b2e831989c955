"""Common corruptions (Hendrycks & Dietterich 2019, ImageNet-C / CIFAR-10-C): accuracy of a
model on its test images corrupted at a severity, and the corruption errors built on it.

The corruptions are the field's implementation, ``imagecorruptions`` (PyPI
``imagecorruptions-imaug``, the maintained fork): the 15 common ones of ImageNet-C and the
4 extra ("validation") ones, severities 1-5, applied to each test image at the model's
resolution (at least 32 px, the library's floor). An evaluation item is named
``corruption_<name>_<severity>`` (``corruption_gaussian_noise_3``) and runs through the
same evaluation as the attacks: per-image masks, a row in results.csv, MLflow metrics.
Its ``AAI`` is the accuracy on the corrupted images (an image counts whether or not the
model got its clean version right, as Hendrycks' error does); ``AOI`` is the clean
accuracy on the same images.

Every corrupted image is a function of (seed, image index, corruption, severity): the
library draws from numpy's global generator, which is seeded per image, and the two
corruptions that keep generators of their own (``impulse_noise``: scikit-image's,
``glass_blur``: numba's) get the same per-image seed as their ``seed`` argument.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from study.attacks.run import changed_record

SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions refuses smaller images
# the library's own lists (imagecorruptions.get_corruption_names), fixed here so that a
# job is checked without importing it (and its numba compilation) at config time
COMMON = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SUBSETS = {"common": COMMON, "extra": EXTRA, "all": COMMON + EXTRA}
OWN_SEED = ("impulse_noise", "glass_blur")  # generators numpy's global seed does not reach
_NAME = re.compile(r"^corruption_(?P<name>[a-z_]+?)_(?P<severity>\d+)$")


class CorruptionError(ValueError):
    """An unknown corruption or a severity outside 1-5."""


@dataclass(frozen=True)
class Corruption:
    corruption: str
    severity: int
    max_images: int | None = None
    kind: str = "corruption"

    @property
    def name(self) -> str:
        return f"corruption_{self.corruption}_{self.severity}"

    # as an attack has them: no norm ball (the evaluation's flags skip corruptions)
    norm: str = "none"
    eps: float = 0.0

    # -- the evaluation item (study.items.Item) --
    def run(self, model, batches, max_images: int | None = None, seed: int = 0) -> dict:
        return accuracy(model, batches, self, max_images=max_images, seed=seed)

    def passes(self, shares: dict) -> float:
        return 0.0  # a forward pass of the corrupted image, no gradient

    def host_seconds(self, side: int) -> float:
        """Corrupting one image of ``side`` px (imagecorruptions, mean over the 15 common
        corruptions at severity 3, one core; benchmarks/README: the fit)."""
        return 2.5e-3 + 1.6e-7 * side * side


def check(names, severities) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The corruption names (a subset's name, ``common`` | ``extra`` | ``all``, or a list)
    and severities of a job, checked: one clear error naming what is wrong."""
    if isinstance(names, str):
        if names not in SUBSETS:
            raise CorruptionError(
                f"unknown corruption subset {names!r} (common, extra, all, or a list of: {', '.join(SUBSETS['all'])})"
            )
        names = SUBSETS[names]
    names = tuple(names)
    unknown = [n for n in names if n not in SUBSETS["all"]]
    if unknown or not names:
        raise CorruptionError(
            f"unknown corruption {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(SUBSETS['all'])}"
        )
    bad = [s for s in severities if isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES]
    if bad or not severities:
        raise CorruptionError(f"corruption severities are integers 1-5, got {list(severities)!r}")
    if len(set(names)) < len(names) or len(set(severities)) < len(severities):
        raise CorruptionError("corruptions: a name or severity is listed twice")
    return names, tuple(severities)


def parse(name: str) -> Corruption | None:
    """The Corruption a result's name stands for; None for an attack's name."""
    m = _NAME.match(name.split("[")[0])
    if not m or m["name"] not in SUBSETS["all"]:
        return None
    return Corruption(m["name"], int(m["severity"]))


def image_seed(seed: int, index: int, corruption: str, severity: int) -> int:
    """The per-image seed: a function of the four, the same in every process (crc32, not
    Python's salted hash)."""
    key = zlib.crc32(corruption.encode())
    return int(np.random.SeedSequence([seed, index, key, severity]).generate_state(1)[0])


def corrupt_images(images: np.ndarray, first: int, corruption: str, severity: int, seed: int) -> np.ndarray:
    """uint8 images (N, H, W, 3), the first of test index ``first``, corrupted one by one."""
    from imagecorruptions import corrupt

    out = np.empty_like(images)
    state = np.random.get_state()  # the caller's global generator is left as it was
    try:
        for i, img in enumerate(images):
            s = image_seed(seed, first + i, corruption, severity)
            np.random.seed(s)
            kw = {"seed": s} if corruption in OWN_SEED else {}
            with warnings.catch_warnings():  # scikit-image and numpy deprecations of the library
                warnings.simplefilter("ignore")
                out[i] = corrupt(img, severity=severity, corruption_name=corruption, **kw)
    finally:
        np.random.set_state(state)
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """A batch in [0, 1] (N, 3, H, W) as uint8 (N, H, W, 3): exact for the loaders' images,
    which are uint8 / 255."""
    return (x.detach().cpu().float() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def corrupt_batch(x: torch.Tensor, first: int, corruption: Corruption, seed: int) -> torch.Tensor:
    """A float batch in [0, 1] corrupted as ``corruption`` says, on its device and layout."""
    images = corrupt_images(to_uint8(x), first, corruption.corruption, corruption.severity, seed)
    out = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return out.to(x.device).contiguous(memory_format=layout)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def accuracy(model: torch.nn.Module, batches, corruption: Corruption, max_images: int | None = None, seed: int = 0):
    """The record of one corruption item, shaped as ``study.attacks.robust_accuracy``'s:
    AOI (clean), AAI (on the corrupted images), DR (their relative drop), per-image masks
    (``robust``: right on the corrupted image), the largest change of a pixel."""
    caps = [c for c in (max_images, corruption.max_images) if c is not None]
    cap = min(caps) if caps else None
    changed = lambda x, first: corrupt_batch(x, first, corruption, seed)  # noqa: E731
    return changed_record(corruption.name, model, batches, cap, changed, clean_too=False, eps_pixels=0.0)


# -- the numbers built on the items ------------------------------------------------------
def items(names) -> dict[str, list[Corruption]]:
    """corruption -> its items among ``names`` (result names), by severity."""
    found: dict[str, list[Corruption]] = {}
    for n in names:
        c = parse(n)
        if c is not None:
            found.setdefault(c.corruption, []).append(c)
    return {k: sorted(v, key=lambda c: c.severity) for k, v in found.items()}


def corruption_errors(acc: dict[str, float], clean: float, ref: dict[str, float], ref_clean: float) -> dict:
    """Hendrycks & Dietterich's numbers of one model from its accuracies (percent) per item
    name and clean, against a reference model's (the unit's standard model): per corruption
    CE = Σ_s E_s / Σ_s E_s(ref) and relative CE = Σ_s (E_s − E_clean) / Σ_s (E_s(ref) −
    E_clean(ref)); mCE and relative mCE their means over the corruptions (ratios in percent;
    NaN where the reference makes no error to divide by). Only items both models have count."""
    ce, rce = {}, {}
    for corruption, its in items([k for k in acc if k in ref]).items():
        e = np.array([100.0 - acc[c.name] for c in its])
        r = np.array([100.0 - ref[c.name] for c in its])
        ce[corruption] = 100.0 * e.sum() / r.sum() if r.sum() > 0 else float("nan")
        d_ref = (r - (100.0 - ref_clean)).sum()
        rce[corruption] = 100.0 * (e - (100.0 - clean)).sum() / d_ref if d_ref > 0 else float("nan")

    def mean(v):
        v = [x for x in v.values() if x == x]
        return float(np.mean(v)) if v else float("nan")

    return {"CE": ce, "relative_CE": rce, "mCE": mean(ce), "relative_mCE": mean(rce)}


def example_grid(image: np.ndarray, names, severities, seed: int = 0, index: int = 0) -> np.ndarray:
    """One uint8 test image (H, W, 3) under every corruption (rows) and severity (columns):
    (len(names), len(severities), H, W, 3), as the evaluation corrupts test image ``index``."""
    return np.stack([np.stack([corrupt_images(image[None], index, n, s, seed)[0] for s in severities]) for n in names])

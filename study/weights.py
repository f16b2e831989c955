"""Pre-trained weights by name, resolved to one file on disk, hashed and checked.

A weights entry (``pretrain.weights`` in a job, NAME in ``study weights``) is one of
  * ``imagenet``: torchvision's default ImageNet weights of the backbone;
  * a torchvision enum by name: ``IMAGENET1K_V1``, ``IMAGENET1K_V2`` (for each backbone
    of the job) or ``ResNet50_Weights.IMAGENET1K_V2`` (that architecture only);
  * ``hf://OWNER/REPO/FILE[@REVISION]`` (or the hub's own ``hf://OWNER/REPO@REVISION/FILE``):
    a file on the Hugging Face hub, fetched by ``huggingface_hub`` into its cache;
  * a catalog name, ``salman/resnet18_linf_eps4.0``: a model of ``study/paper/weights.yaml``
    (its architecture, threat model, hub file and published accuracy);
  * a path.

``parse`` only reads the name (no I/O: ``study plan`` and the job checks use it);
``fetch`` brings the file into the cache (or finds it there), hashes it and refuses a
file whose sha256 differs from the entry's pin, all before any model is built. Downloads
honour ``HF_HOME`` / ``HF_HUB_CACHE``, ``TORCH_HOME`` and a job's own cache folder;
``HF_HUB_OFFLINE=1`` turns every download off, torchvision's included.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import yaml

from study.backbones import BACKBONES, ModelError
from study.files import sha256

CATALOG = Path(__file__).with_name("paper") / "weights.yaml"
ENUM = re.compile(r"^(?:(?P<cls>\w+_Weights)\.)?(?P<name>[A-Z][A-Z0-9_]*)$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
IMAGENET_CLASSES = 1000


class WeightsError(ModelError):
    """Weights that cannot be named, fetched or trusted; the message says which and why."""


@cache
def catalog() -> dict[str, dict]:
    """Every catalog model by its full name (``salman/resnet18_linf_eps4.0``), with its
    namespace's repo, citation and where its published numbers come from."""
    raw = yaml.safe_load(CATALOG.read_text())
    out = {}
    for ns, spec in raw.items():
        meta = {k: v for k, v in spec.items() if k != "models"}
        for name, model in spec["models"].items():
            out[f"{ns}/{name}"] = {
                "name": f"{ns}/{name}",
                "namespace": ns,
                **meta,
                "file": f"{name}.ckpt",
                "robust": None,
                "sha256": None,
                **model,
            }
    return out


def namespaces() -> set[str]:
    return {e["namespace"] for e in catalog().values()}


def threat(entry: dict) -> str:
    """A catalog model's threat model in words: ``L-inf eps 4/255``, ``L2 eps 3``, ``standard``."""
    if not entry.get("eps"):
        return "standard"
    return f"L-inf eps {entry['eps']:g}/255" if entry["norm"] == "linf" else f"L2 eps {entry['eps']:g}"


@dataclass(frozen=True)
class Source:
    """What a weights entry names, before anything is fetched."""

    spec: str  # as written
    kind: str  # torchvision | hub | file
    arch: str | None = None  # the architecture the name fixes (None: the job's backbone)
    repo: str | None = None  # hub
    filename: str | None = None
    revision: str | None = None
    enum: str | None = None  # torchvision: ResNet18_Weights.IMAGENET1K_V1
    url: str | None = None
    path: str | None = None  # file
    entry: dict | None = field(default=None, compare=False, hash=False)  # catalog

    @property
    def where(self) -> str:
        """Where the file comes from, in one phrase."""
        if self.kind == "hub":
            return f"hf://{self.repo}/{self.filename}" + (f"@{self.revision}" if self.revision else "")
        return self.enum or self.spec if self.kind == "torchvision" else str(self.path)

    @property
    def trained_on(self) -> str:
        """The source task, for results' source_data: ImageNet for torchvision's and the
        catalog's models, else the file's stem."""
        if self.kind == "torchvision" or (self.entry or {}).get("trained_on") == "imagenet":
            return "imagenet"
        return PurePosixPath(self.filename or self.path).stem

    @property
    def published(self) -> float | None:
        """The clean ImageNet top-1 (%) its authors published, where known."""
        if self.entry:
            return self.entry.get("clean")
        if self.enum:
            return _torchvision_meta(self.enum).get("acc@1")
        return None


def parse(spec: str, backbone: str | None = None) -> Source:
    """The Source a weights entry names; for ``backbone``, refused when the name fixes
    another architecture. No file is touched."""
    if not isinstance(spec, str) or not spec.strip():
        raise WeightsError(f"a weights entry is a name, an hf:// address or a path, got {spec!r}")
    if spec == "imagenet" or ENUM.match(spec):
        src = _torchvision(spec, backbone)
    elif spec.startswith("hf://"):
        src = _hub(spec)
    elif spec.split("/", 1)[0] in namespaces():
        src = _catalog(spec)
    else:
        src = Source(spec, "file", path=spec)
    if backbone is not None and src.arch is not None and src.arch != backbone:
        raise WeightsError(f"{spec} holds a {src.arch}, not a {backbone}")
    return src


def _torchvision(spec: str, backbone: str | None) -> Source:
    import torchvision.models as tvm

    m = ENUM.match(spec)
    if m and m["cls"]:
        try:
            w = tvm.get_weight(spec)
        except (ValueError, KeyError, AttributeError):
            raise WeightsError(f"{spec}: torchvision has no such weights") from None
        arch = next((b for b in BACKBONES if _enum_of(b) is type(w)), None)
        if arch is None:
            raise WeightsError(
                f"{spec}: weights of an architecture study has no backbone for (known: {', '.join(BACKBONES)})"
            )
    elif backbone is None:
        return Source(spec, "torchvision")  # one per backbone of the job; resolved with it
    else:
        enum, name = _enum_of(backbone), "DEFAULT" if spec == "imagenet" else spec
        if enum is None:
            raise WeightsError(f"{spec}: torchvision has no ImageNet weights for {backbone}")
        if name not in enum.__members__:
            raise WeightsError(
                f"torchvision has no {spec} weights for {backbone} (has: {', '.join(e.name for e in enum)})"
            )
        w, arch = enum[name], backbone
    return Source(spec, "torchvision", arch=arch, enum=str(w), url=w.url)


def _enum_of(backbone: str):
    """torchvision's weights enum of a backbone (None: not a torchvision model, e.g. vit_tiny_p4)."""
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(backbone)
    except (ValueError, KeyError):
        return None


def _torchvision_meta(enum: str) -> dict:
    import torchvision.models as tvm

    w = tvm.get_weight(enum)
    return {"acc@1": w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"), "recipe": w.meta.get("recipe")}


def _hub(spec: str) -> Source:
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        uri = parse_hf_uri(spec)
    except HfUriError as err:
        raise WeightsError(f"{spec}: not a hub address ({err}); write hf://OWNER/REPO/FILE[@REVISION]") from None
    path, revision = uri.path_in_repo, uri.revision
    if revision is None and "@" in path.rsplit("/", 1)[-1]:  # the trailing form, FILE@REVISION
        path, revision = path.rsplit("@", 1)
    if uri.type != "model" or not path:
        raise WeightsError(f"{spec}: name a file of a model repository, hf://OWNER/REPO/FILE[@REVISION]")
    if any(part in ("..", ".", "") for part in path.split("/")):  # the hub refuses them too, later
        raise WeightsError(f"{spec}: a file path in a repository has no '..', '.' or empty segments")
    entry = next((e for e in catalog().values() if e["repo"] == uri.id and e["file"] == path), None)
    return Source(spec, "hub", arch=entry and entry["arch"], repo=uri.id, filename=path, revision=revision, entry=entry)


def _catalog(spec: str) -> Source:
    entries = catalog()
    if spec not in entries:
        near = difflib.get_close_matches(spec, list(entries), n=3, cutoff=0.6)
        raise WeightsError(
            f"unknown weights {spec!r}"
            + (f" (nearest: {', '.join(near)})" if near else "")
            + "; `study weights list` shows the catalog"
        )
    e = entries[spec]
    return Source(spec, "hub", arch=e["arch"], repo=e["repo"], filename=e["file"], revision=e.get("revision"), entry=e)


# -- fetching and pinning ---------------------------------------------------------------
@dataclass(frozen=True)
class Fetched:
    source: Source
    path: Path
    sha256: str
    revision: str | None = None  # the hub commit the file is from

    def record(self) -> dict:
        """What a stage's record and MLflow run keep of it."""
        out = {
            "weights": self.source.spec,
            "weights_from": self.source.where,
            "weights_file": str(self.path),
            "weights_sha256": self.sha256,
        }
        return out | ({"weights_revision": self.revision} if self.revision else {})


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch(src: Source, cache: Path | None = None, pin: str | None = None, download: bool = True) -> Fetched:
    """The file ``src`` names, from the cache or downloaded into it, with its sha256;
    refused when it differs from ``pin`` (or the catalog entry's own)."""
    revision = None
    if src.kind == "file":
        path = Path(src.path).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
    elif src.kind == "hub":
        path, revision = _from_hub(src, cache, download)
    else:
        path = _from_torchvision(src, cache, download)
    digest = sha256(path)
    want = (pin or (src.entry or {}).get("sha256") or "").lower()
    if want and digest != want:
        raise WeightsError(
            f"{src.spec}: {path} has sha256 {digest}, not the pinned {want}: "
            f"the file changed (upstream or on disk); check it with `study weights verify` "
            f"before pinning the new hash"
        )
    return Fetched(src, path, digest, revision)


def cached(src: Source, cache: Path | None = None) -> Path | None:
    """Where the file already lies, without downloading (None: not cached, or a hub
    revision that only the hub can resolve)."""
    if src.kind == "file":
        p = Path(src.path).expanduser()
        return p if p.is_file() else None
    if src.kind == "torchvision":
        if src.url is None:
            return None
        dst = _torchvision_file(src, cache)
        return dst if dst.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(src.repo, src.filename, cache_dir=cache, revision=src.revision)
    return Path(p) if isinstance(p, str) else None


def _from_hub(src: Source, cache: Path | None, download: bool) -> tuple[Path, str]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        p = hf_hub_download(
            src.repo, src.filename, revision=src.revision, cache_dir=cache, local_files_only=not download
        )
    except LocalEntryNotFoundError:
        where = cache or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"
        raise WeightsError(
            f"{src.spec}: {src.where} is not in the hub cache ({where}) and {why}: run "
            f"`study weights fetch {src.spec}` where the hub is reachable, then copy that "
            f"cache here (or point HF_HOME at a copy)"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise WeightsError(f"{src.spec}: {src.where} is not on the hub ({type(err).__name__})") from None
    except HfHubHTTPError as err:
        raise WeightsError(f"{src.spec}: the hub refused {src.where} ({str(err).splitlines()[0]})") from None
    p = Path(p)  # <cache>/models--OWNER--REPO/snapshots/<commit>/FILE
    return p, p.parents[len(PurePosixPath(src.filename).parts) - 1].name


def _torchvision_file(src: Source, cache: Path | None) -> Path:
    import torch.hub

    folder = Path(cache) / "torchvision" if cache else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / os.path.basename(urlparse(src.url).path)


def _from_torchvision(src: Source, cache: Path | None, download: bool) -> Path:
    import torch.hub

    if src.url is None:
        raise WeightsError(f"{src.spec}: torchvision's weights by enum name need a backbone (--backbone)")
    dst = _torchvision_file(src, cache)
    prefix = torch.hub.HASH_REGEX.search(dst.name)  # torchvision's file names carry their hash's start
    if not dst.is_file():
        if not download or offline():
            raise WeightsError(
                f"{src.spec}: {src.enum} is not in {dst.parent} and downloads are off "
                f"(HF_HUB_OFFLINE): run `study weights fetch {src.enum}` where the internet is "
                f"reachable and copy {dst.name} into {dst.parent}"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:  # to a temporary file, moved into place once its hash prefix checks out
            torch.hub.download_url_to_file(src.url, str(dst), prefix.group(1) if prefix else None)
        except Exception as err:
            raise WeightsError(f"{src.spec}: could not download {src.url} ({err})") from None
    if prefix and not sha256(dst).startswith(prefix.group(1)):
        raise WeightsError(
            f"{src.spec}: {dst} is damaged: its sha256 does not start with {prefix.group(1)}, "
            f"as torchvision's file name says; delete it and fetch again"
        )
    return dst


def load(model, fetched: Fetched, keep_classifier: bool = False) -> str:
    """Loads the fetched file into ``model`` (study.models.load_trunk_weights); the
    format found. A file of another architecture is refused naming it and both."""
    from study.models import load_trunk_weights

    origin = (
        f"{fetched.source.spec} ({fetched.path})" if fetched.source.spec != str(fetched.path) else str(fetched.path)
    )
    return load_trunk_weights(model, fetched.path, keep_classifier, origin=origin)


def checked(fetched: Fetched, arch: str, resolutions, classes: int = 1000):
    """The fetched file loaded into the study's ``arch`` and held to the model contract
    (study.contract) at each of ``resolutions``: ContractError, one line, on a broken term;
    else the model and its terms at the last resolution."""
    from study import contract
    from study.models import build_model

    terms = []
    for side in sorted(set(resolutions)):
        model = build_model(arch, classes, side)
        load(model, fetched)
        terms = contract.check(model, f"{fetched.source.spec} ({arch})", classes, side)
    return model, terms


# -- the catalog as a table, and checking a model against its published accuracy ------------
def listing(backbones=None) -> list[dict]:
    """The catalog and torchvision's ImageNet weights of study's backbones, one row each."""
    unknown = [b for b in backbones or () if b not in BACKBONES]
    if unknown:
        raise WeightsError(f"unknown backbone {unknown[0]!r} (known: {', '.join(BACKBONES)})")
    rows = [
        {
            "name": e["name"],
            "arch": e["arch"],
            "threat model": threat(e),
            "file": f"hf://{e['repo']}/{e['file']}",
            "clean %": e.get("clean"),
            "robust %": e.get("robust"),
            "sha256": e.get("sha256") or "",
        }
        for e in catalog().values()
        if backbones is None or e["arch"] in backbones
    ]
    for b in BACKBONES if backbones is None else backbones:
        for w in _enum_of(b) or ():
            rows.append(
                {
                    "name": str(w),
                    "arch": b,
                    "threat model": "standard",
                    "file": w.url,
                    "clean %": _torchvision_meta(str(w))["acc@1"],
                    "robust %": None,
                    "sha256": "",
                }
            )
    return rows


def default_attack(src: Source) -> str:
    """PGD-10 at the model's own radius, in study's attack names (L-inf eps in 1/255)."""
    e = src.entry or {}
    if not e.get("eps"):
        raise WeightsError(
            f"{src.spec}: a standard model has no eps of its own; give --attack NAME (e.g. pgd10_linf_0.5)"
        )
    return f"pgd10_{e['norm']}_{e['eps']:g}"


def verify(
    fetched: Fetched,
    arch: str,
    root,
    images: int,
    attack: str | None = None,
    resolution: int = 224,
    batch_size: int = 50,
    device: str = "cpu",
) -> dict:
    """Clean top-1 (and, with ``attack``, robust) accuracy of the model on ``images``
    images of ImageNet's validation folder (ROOT/val, one folder per class; a
    class-interleaved sample), evaluated as published: resize to 8/7 of the side,
    centre crop. Returns the numbers with the clean accuracy's Wilson interval."""
    import torch

    from study import stats
    from study.attacks import parse_attack, robust_accuracy
    from study.data.registry import build_split
    from study.models import build_model

    data = build_split(
        "imagenet", "test", root=root, params={"test_per_class": max(1, math.ceil(images / IMAGENET_CLASSES))}
    )
    if len(data.classes) != IMAGENET_CLASSES:
        raise WeightsError(
            f"{root}: its validation folder has {len(data.classes)} class folders; ImageNet's "
            f"has {IMAGENET_CLASSES} (one per wnid, sorted, as torchvision's ImageFolder reads them)"
        )
    model = build_model(arch, IMAGENET_CLASSES)
    load(model, fetched, keep_classifier=True)
    model.eval().to(device)
    n = min(images, len(data))
    batches = _batches(data, n, resolution, batch_size, device)
    if attack is None:
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        out = {"images": n, "clean": 100.0 * correct / n}
    else:
        rec = robust_accuracy(model, batches, parse_attack(attack))
        correct = int(rec["correct"].sum())
        out = {"images": n, "clean": rec["AOI"], "robust": rec["AAI"], "attack": rec["attack"]}
    lo, hi = stats.wilson(correct, n)
    return out | {"clean_lo": lo, "clean_hi": hi}


def _batches(data, n: int, resolution: int, batch_size: int, device):
    """(images in [0, 1], labels) of the first n items: resized (shorter side to 8/7 of
    ``resolution``) and centre-cropped, as ImageNet accuracies are published."""
    import torch
    from torchvision.transforms.v2 import functional as F

    side = round(resolution / 0.875)
    for start in range(0, n, batch_size):
        xs, ys = [], []
        for i in range(start, min(n, start + batch_size)):
            img, label = data[i]
            x = F.center_crop(
                F.resize(torch.from_numpy(img.copy()).permute(2, 0, 1), [side], antialias=True), [resolution]
            )
            xs.append(x)
            ys.append(label)
        yield torch.stack(xs).float().div_(255).to(device), torch.tensor(ys, device=device)

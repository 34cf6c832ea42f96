"""Glyph datasets rendered offline from Debian font packages: an Omniglot-style stand-in for real images.

A class is a character; its samples are the character in each font, times seeded augmentations (scale, rotation,
shift, stroke width, blur, noise). Han characters present in all eight fonts give the in-domain classes, split
deterministically into disjoint pretraining / zoo / validation / test sets; Hangul syllables (in the three of those
fonts that have them) give the cross-domain test set. Images are written in ImageFolder layout.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

# Debian package -> font file (face 0 of collections). No other fonts are used: every other font stays unseen.
FONTS = {
    "fonts-ipafont-gothic": "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
    "fonts-ipafont-mincho": "/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf",
    "fonts-wqy-microhei": "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "fonts-wqy-zenhei": "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "fonts-arphic-ukai": "/usr/share/fonts/truetype/arphic/ukai.ttc",
    "fonts-arphic-uming": "/usr/share/fonts/truetype/arphic/uming.ttc",
    "fonts-droid-fallback": "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "fonts-unifont": "/usr/share/fonts/opentype/unifont/unifont.otf",
}
HAN = (0x4E00, 0x9FFF)
HANGUL = (0xAC00, 0xD7A3)
# Unicode blocks per script. Kana keeps full-size letters only (small kana repeat their big forms).
SCRIPTS = {"han": (HAN,), "hangul": (HANGUL,), "kana": ((0x3041, 0x309F), (0x30A0, 0x30FF))}
STYLES = ("plain", "tint", "clutter")


@dataclass
class SplitSpec:
    """Classes per split and augmented samples per (class, font)."""

    pretrain: int = 250
    zoo: int = 250
    val: int = 50
    test: int = 200
    cross: int = 200
    train_aug: int = 4  # per font, for the pretraining classes (and the zoo's, unless `zoo_aug` is set)
    zoo_aug: Optional[int] = None  # per font, for the zoo classes; None: `train_aug` (v1 and v2)
    eval_aug: int = 3  # per font, for val and test classes (8 fonts -> 24 images)
    cross_aug: int = 8  # per font, for the cross-domain classes (3 fonts -> 24 images)
    size: int = 32
    seed: int = 0
    # "plain": dark ink on light paper. "tint": ink and paper in random colours per image, with at least
    # `min_contrast` luminance difference and either polarity (a style shift that keeps the glyph readable).
    # "clutter": plain, with `clutter` fragments of other characters of the same script (from none of the splits)
    # intruding from the image's edges around the centred class glyph.
    source_style: str = "plain"  # the pretraining split (the foundation's, and the BN prior's, data)
    downstream_style: str = "plain"  # the zoo, validation, test and cross-domain splits
    min_contrast: float = 0.35
    clutter: int = 2
    # The zoo, validation and test classes are always Han. The pretraining classes are Han too ("han": v1) or another
    # script ("hangul": the foundation never sees Han); the cross-domain classes are a script no other split uses.
    source_script: str = "han"
    cross_script: str = "hangul"
    # Further scripts whose every covered letter joins the pretraining split (plain, `train_aug` per font): a broader
    # source for the foundation and its prior. None of them may be the cross-domain script.
    source_extra: tuple[str, ...] = ()
    # The BN prior's own split "prior": the first `prior_classes` pretraining classes and every letter of
    # `source_extra`, `prior_aug` images per font. The prior is a classifier, which converges on a few hundred classes
    # with many images each, not on thousands with a few. None: the prior trains on the pretraining split.
    prior_classes: Optional[int] = None
    prior_aug: int = 4
    # Also render the test characters in this style as the split "test-<style>": the foundation's own world, for
    # checking that a meta-LoRA tuned for the downstream style does no damage there. None: no such split.
    check_style: Optional[str] = None

    def __post_init__(self):
        self.source_extra = tuple(self.source_extra)  # JSON manifests hold lists
        for name in ("source_style", "downstream_style"):
            if getattr(self, name) not in STYLES:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {STYLES}")
        if self.source_script not in ("han", "hangul"):
            raise ValueError(f"source_script={self.source_script!r}: choose 'han' or 'hangul'")
        if self.cross_script not in SCRIPTS or self.cross_script in ("han", self.source_script):
            raise ValueError(
                f"cross_script={self.cross_script!r}: choose a script of {sorted(SCRIPTS)} that no other "
                f"split uses (pretraining: {self.source_script}, downstream: han)"
            )
        for script in self.source_extra:
            if script not in SCRIPTS or script in ("han", self.source_script, self.cross_script):
                raise ValueError(
                    f"source_extra={self.source_extra!r}: {script!r} must be a script of "
                    f"{sorted(SCRIPTS)} other than han, the source script and the cross-domain script"
                )
        if len(set(self.source_extra)) != len(self.source_extra):
            raise ValueError(f"source_extra={self.source_extra!r}: a script is named twice")
        if self.check_style is not None and self.check_style not in STYLES:
            raise ValueError(f"check_style={self.check_style!r}: choose one of {STYLES} or None")
        if self.prior_classes is not None and not (
            isinstance(self.prior_classes, int) and 1 <= self.prior_classes <= self.pretrain
        ):
            raise ValueError(
                f"prior_classes={self.prior_classes!r}: must be None or from 1 to pretrain={self.pretrain}"
            )
        for name in ("train_aug", "eval_aug", "cross_aug", "zoo_aug", "prior_aug"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if self.clutter < 0:
            raise ValueError(f"clutter={self.clutter!r}: must be >= 0")
        if not 0 <= self.min_contrast < 1:
            raise ValueError(f"min_contrast={self.min_contrast!r}: must be in [0, 1)")


def missing_fonts() -> list[str]:
    return [pkg for pkg, path in FONTS.items() if not Path(path).is_file()]


def _cmap(path: str) -> set[int]:
    from fontTools.ttLib import TTFont

    return set(TTFont(path, fontNumber=0, lazy=True).getBestCmap())


def coverage(blocks: tuple[tuple[int, int], ...]) -> tuple[list[str], list[str]]:
    """(letters of `blocks` present in every font that covers at least a fifth of them, those fonts' packages)."""
    import unicodedata

    def wanted(c: int) -> bool:
        return (
            any(lo <= c <= hi for lo, hi in blocks)
            and unicodedata.category(chr(c)) == "Lo"
            and "SMALL" not in unicodedata.name(chr(c), "")
        )

    sets = {pkg: {c for c in _cmap(path) if wanted(c)} for pkg, path in FONTS.items()}
    size = sum(hi - lo + 1 for lo, hi in blocks)
    usable = [pkg for pkg, s in sets.items() if len(s) >= 0.2 * size]
    common = set.intersection(*(sets[p] for p in usable))
    return [chr(c) for c in sorted(common)], usable


def _tint_colours(rng: random.Random, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """(ink, paper) RGB in [0, 1] whose luminances differ by at least `min_contrast`."""
    from recycle.priors import LUMA

    luma = np.array(LUMA)
    while True:
        ink, paper = np.array([rng.random() for _ in range(3)]), np.array([rng.random() for _ in range(3)])
        if abs(float(luma @ ink) - float(luma @ paper)) >= min_contrast:
            return ink, paper


def recolour(x: "torch.Tensor", generator: "torch.Generator", min_contrast: float = 0.35) -> "torch.Tensor":
    """Plain glyphs (dark ink on light paper) ``(N, 3, H, W)`` uint8 -> the same glyphs in random ink and paper
    colours per image, drawn as the ``tint`` style draws them (luminances at least `min_contrast` apart, either
    polarity); the ink coverage is ``1 - gray / 255``."""
    import torch

    from recycle.priors import ink_and_paper

    ink, paper = ink_and_paper(x.shape[0], min_contrast, generator)  # rejection sampling, as _tint_colours
    alpha = 1 - x.float().mean(1, keepdim=True) / 255
    out = alpha * ink[:, :, None, None] + (1 - alpha) * paper[:, :, None, None]
    return (255 * out).round().clamp(0, 255).to(torch.uint8)


def render(
    char: str,
    font: ImageFont.FreeTypeFont,
    rng: random.Random,
    size: int = 32,
    augment: bool = True,
    style: str = "plain",
    min_contrast: float = 0.35,
    distractors: Sequence[str] = (),
    clutter: int = 2,
) -> Image.Image:
    """One glyph, ``size``×``size`` RGB, augmented with `rng`: dark on light (``plain``), in random ink and paper
    colours (``tint``), or plain with `clutter` characters drawn from `distractors` cut by the image's edges
    (``clutter``)."""
    canvas = 4 * size
    img = Image.new("L", (canvas, canvas), 255)
    draw = ImageDraw.Draw(img)
    stroke = rng.choice([0, 0, 1, 2]) if augment else 0
    draw.text((canvas / 2, canvas / 2), char, font=font, fill=0, anchor="mm", stroke_width=stroke, stroke_fill=0)
    if style == "clutter":
        if not distractors:
            raise ValueError("style='clutter' needs distractor characters")
        for _ in range(clutter):  # centred 0.55-0.75 canvas away: 30-60% of the fragment shows at an edge or corner
            angle, radius = rng.uniform(0, 2 * math.pi), rng.uniform(0.55, 0.75) * canvas
            draw.text(
                (canvas / 2 + radius * math.cos(angle), canvas / 2 + radius * math.sin(angle)),
                rng.choice(distractors),
                font=font,
                fill=0,
                anchor="mm",
                stroke_width=stroke,
                stroke_fill=0,
            )
    if augment:
        angle = rng.uniform(-12, 12)
        scale = rng.uniform(0.8, 1.1)
        dx, dy = rng.uniform(-0.08, 0.08) * canvas, rng.uniform(-0.08, 0.08) * canvas
        img = img.rotate(angle, resample=Image.BICUBIC, fillcolor=255)
        img = img.transform(
            img.size,
            Image.AFFINE,
            (1 / scale, 0, (1 - 1 / scale) * canvas / 2 - dx, 0, 1 / scale, (1 - 1 / scale) * canvas / 2 - dy),
            resample=Image.BICUBIC,
            fillcolor=255,
        )
    img = img.resize((size, size), Image.LANCZOS)
    if augment:
        blur = rng.uniform(0, 0.7)
        if blur > 0.1:
            img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.repeat(np.asarray(img, dtype=np.float32)[..., None], 3, axis=2)  # (size, size, 3), ink 0, paper 255
    if style == "tint":
        ink, paper = _tint_colours(rng, min_contrast)
        alpha = 1 - arr / 255
        arr = 255 * (alpha * ink + (1 - alpha) * paper)
    elif style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {STYLES}")
    if augment:
        sigma = rng.uniform(0, 10)
        arr = arr + np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, arr.shape[:2])[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _render_split(
    root: Path,
    chars: list[str],
    packages: list[str],
    n_aug: int,
    size: int,
    seed: int,
    style: str = "plain",
    min_contrast: float = 0.35,
    distractors: Sequence[str] = (),
    clutter: int = 2,
) -> None:
    fonts = {pkg: ImageFont.truetype(FONTS[pkg], size=int(2.6 * size), index=0) for pkg in packages}
    for k, ch in enumerate(chars):
        d = root / ch  # the class is named by its character
        d.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}-{ord(ch)}")
        for f, (pkg, font) in enumerate(fonts.items()):
            for a in range(n_aug):
                render(
                    ch,
                    font,
                    rng,
                    size,
                    style=style,
                    min_contrast=min_contrast,
                    distractors=distractors,
                    clutter=clutter,
                ).save(d / f"{f}_{a}.png")
        if (k + 1) % 200 == 0:
            _logger.info("%s: %d/%d classes", root.name, k + 1, len(chars))


def build(out: Path, spec: SplitSpec = SplitSpec(), only: Optional[tuple[str, ...]] = None) -> dict:
    """Render the splits (all, or those in `only`) into `out`; returns the split manifest.

    The class lists depend only on `spec` and the fonts, so rendering one split alone (e.g. the test split, to
    re-check shipped weights) gives exactly the images a full run renders.
    """
    missing = missing_fonts()
    if missing:
        raise FileNotFoundError(f"missing font packages {missing}; install them: apt-get install {' '.join(missing)}")
    manifest_path = out / "splits.json"
    if manifest_path.is_file() and only is None:
        manifest = json.loads(manifest_path.read_text())
        if SplitSpec(**manifest["spec"]) == spec:  # manifests written before a field existed get its default
            return manifest
        raise ValueError(f"{out} was rendered with other settings; use another folder")
    chars, fonts = {}, {}
    rng = random.Random(spec.seed)
    for script in ("han", "hangul", "kana"):  # Han, then Hangul, shuffled by one generator (as v1 did)
        chars[script], fonts[script] = coverage(SCRIPTS[script])
        (rng if script != "kana" else random.Random(f"{spec.seed}-{script}")).shuffle(chars[script])
    used = {script: 0 for script in chars}

    def take(script: str, n: int, split: str) -> list[str]:
        if used[script] + n > len(chars[script]):
            raise ValueError(
                f"not enough {script} characters for the {split} split: {len(chars[script])} exist, "
                f"{used[script]} are taken"
            )
        used[script] += n
        return chars[script][used[script] - n : used[script]]

    splits = {"pretrain": take(spec.source_script, spec.pretrain, "pretrain")}
    for name in ("zoo", "val", "test"):
        splits[name] = take("han", getattr(spec, name), name)
    splits["cross"] = take(spec.cross_script, spec.cross, "cross")
    script_of = {"pretrain": spec.source_script, "cross": spec.cross_script}
    # Clutter comes from characters of no split: the rest of each script, in a fixed order.
    distractors = {script: sorted(c[used[script] :]) for script, c in chars.items()}
    # (split, script, classes, augmentations per font, style)
    jobs = []
    for name, members in splits.items():
        n_aug = {"pretrain": spec.train_aug, "zoo": spec.zoo_aug or spec.train_aug, "cross": spec.cross_aug}.get(
            name, spec.eval_aug
        )
        style = spec.source_style if name == "pretrain" else spec.downstream_style
        jobs.append((name, script_of.get(name, "han"), members, n_aug, style))
    for script in spec.source_extra:  # every letter of the script, beside the source script's classes
        jobs.append(("pretrain", script, chars[script], spec.train_aug, spec.source_style))
    if spec.prior_classes is not None:
        jobs.append(
            ("prior", spec.source_script, splits["pretrain"][: spec.prior_classes], spec.prior_aug, spec.source_style)
        )
        jobs += [("prior", script, chars[script], spec.prior_aug, spec.source_style) for script in spec.source_extra]
    if spec.check_style is not None:
        jobs.append((f"test-{spec.check_style}", "han", splits["test"], spec.eval_aug, spec.check_style))
    for name, script, members, n_aug, style in jobs:
        if only is not None and name not in only:
            continue
        _render_split(
            out / name,
            sorted(members),
            fonts[script],
            n_aug,
            spec.size,
            spec.seed,
            style,
            spec.min_contrast,
            distractors[script],
            spec.clutter,
        )
    sizes = {k: len(v) for k, v in splits.items()}
    sizes["pretrain"] += sum(len(chars[s]) for s in spec.source_extra)
    if spec.prior_classes is not None:
        sizes["prior"] = spec.prior_classes + sum(len(chars[s]) for s in spec.source_extra)
    if spec.check_style is not None:
        sizes[f"test-{spec.check_style}"] = len(splits["test"])
    manifest = {
        "spec": asdict(spec),
        "fonts": fonts,
        "available": {k: len(v) for k, v in chars.items()},
        "splits": sizes,
    }
    if only is None:
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def example_task(
    split_root: Path, n_classes: int, seed: int, shots: int = 1, queries: int = 2
) -> Optional[dict[str, list[Path]]]:
    """A few classes of a rendered split, for bundled examples: {class: [support..., query...]}."""
    classes = sorted(p for p in split_root.iterdir() if p.is_dir())
    if len(classes) < n_classes:
        return None
    rng = random.Random(seed)
    return {c.name: rng.sample(sorted(c.glob("*.png")), shots + queries) for c in rng.sample(classes, n_classes)}

"""The toy world: a few coloured shapes on a background, rendered at 64x64 px.

Each scene stands in for a COCO image. Like COCO, a scene comes with five captions and one
box per object, written as LLaVA's `caps_boxes` JSONL (llava-facts section 5): that symbolic
record is all the rule-based teacher (teacher.py) ever sees, as GPT-4 saw only captions and
boxes. `build_world` writes images and every data file in the formats of the real data, so
the training scripts cannot tell toy from real.
"""
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 8
IMAGE_SIZE = 64   # drawn at 64x64 px; the tiny CLIP resizes to 72 px and cuts 24 px patches, one per grid cell
SUPERSAMPLE = 4   # shapes are drawn at 4x and averaged down: smooth, exactly-known edges

SHAPES = ["circle", "square", "triangle", "diamond"]
# Saturated colours, far from each other and from every (neutral grey) background.
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 95, 230),
          "yellow": (240, 205, 35), "purple": (150, 60, 195)}
# Side of an object in pixels; the gap between the ranges keeps "small"/"large" unambiguous.
SIZES = {"small": (9.0, 12.0), "large": (17.0, 21.0)}
SIZE_THRESHOLD = 14.5 / IMAGE_SIZE  # a box wider than this (normalized) is "large"
# Position words come from a 3x3 grid on the box centre, read row by row.
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
BACKGROUNDS = ["plain light gray", "plain dark gray", "gray gradient",
               "speckled light gray", "speckled dark gray"]
MAX_OBJECTS = 4
# px an object's centre may move from its grid cell's centre. Small on purpose: a tiny ViT learns
# shapes that wander inside its 24 px patches only slowly (at 5 px, 58% of shapes named after 640
# steps; at 2 px, 97% after 320). Large neighbours can still overlap.
JITTER = 2.0
MIN_VISIBLE = 0.8  # later-drawn shapes may hide at most 20% of an earlier one
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# How a position word reads inside a sentence: "a red circle in the top left".
PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
           "left": "on the left", "center": "in the center", "right": "on the right",
           "bottom left": "in the bottom left", "bottom": "at the bottom",
           "bottom right": "in the bottom right"}


def grid_position(bbox):
    """The position word of a normalized [x1, y1, x2, y2] box: its centre's cell on a 3x3 grid."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    return POSITIONS[3 * row + col]


def join_words(items):
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count(n, noun):
    """'no shapes', 'one shape', 'three shapes'."""
    return f"no {noun}s" if n == 0 else f"{NUMBER_WORDS[n]} {noun}{'s' if n > 1 else ''}"


# ---------------------------------------------------------------- scenes

@dataclass
class Shape:
    color: str
    shape: str
    size: str
    bbox: list  # [x1, y1, x2, y2] normalized, measured on the drawn pixels

    @property
    def category(self):
        return f"{self.color} {self.shape}"

    @property
    def position(self):
        return grid_position(self.bbox)


@dataclass
class Scene:
    id: str
    split: str
    index: int
    background: str
    objects: list        # in drawing order: later ones lie on top
    pixels: np.ndarray   # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8

    @property
    def image(self):
        """Path relative to the image folder, as the `image` field of LLaVA JSON."""
        return f"{self.split}/{self.index:06d}.png"


def scene_rng(seed, split, index, attempt=0):
    # Every scene gets its own generator, so any image can be re-made alone, byte for byte.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, attempt])


def shape_mask(shape, box):
    """Coverage in [0, 1] of `shape` drawn in `box` (pixels, floats), (IMAGE_SIZE, IMAGE_SIZE).

    Drawn at SUPERSAMPLE x and averaged down (a box filter), so each pixel holds the fraction
    of it the shape covers: anti-aliasing whose box and pixels come from the same mask.
    """
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = (v * s for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=255)
    elif shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def mask_bbox(mask):
    """Normalized [x1, y1, x2, y2] of the pixels at least half covered (3 decimals, as LLaVA prints)."""
    ys, xs = np.nonzero(mask >= 0.5)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return [round(float(v) / IMAGE_SIZE, 3) for v in box]


def render_background(kind, rng):
    """A neutral grey canvas (IMAGE_SIZE, IMAGE_SIZE, 3), float; never a saturated colour."""
    n = IMAGE_SIZE
    tint = rng.uniform(-6, 6, size=3)  # a faint warm/cool cast for variety, still grey
    light, dark = rng.uniform(195, 235), rng.uniform(25, 60)
    if kind == "gray gradient":
        ramp = np.linspace(light, dark, n)[::rng.choice([1, -1])]
        plane = np.tile(ramp, (n, 1))  # varies along x
        if rng.random() < 0.5:
            plane = plane.T            # ... or along y
    else:
        plane = np.full((n, n), light if "light" in kind else dark)
        if kind.startswith("speckled"):
            plane = plane + rng.normal(0, 8, size=(n, n))
    return np.clip(plane[:, :, None] + tint, 0, 255)


def sample_scene(seed, split, index, attempt=0):
    """Scene `index` of `split`: 1-4 shapes with distinct (colour, shape) and distinct grid cells."""
    rng = scene_rng(seed, split, index, attempt)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [pairs[k] for k in rng.choice(len(pairs), n, replace=False)]  # "the red circle" names one object
    cell = IMAGE_SIZE / 3
    while True:  # re-place until every shape is mostly visible (a few tries at most)
        objects, masks = [], []
        for (color, shape), k in zip(chosen, rng.choice(9, n, replace=False)):
            size = "large" if rng.random() < 0.5 else "small"
            side = rng.uniform(*SIZES[size])
            # Centre near the cell's centre; clamped so the shape stays inside the image.
            cx = np.clip((k % 3 + 0.5) * cell + rng.uniform(-JITTER, JITTER), side / 2 + 1, IMAGE_SIZE - side / 2 - 1)
            cy = np.clip((k // 3 + 0.5) * cell + rng.uniform(-JITTER, JITTER), side / 2 + 1, IMAGE_SIZE - side / 2 - 1)
            mask = shape_mask(shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
            obj = Shape(color, shape, size, mask_bbox(mask))
            assert obj.position == POSITIONS[k], "the jitter must keep each centre in its cell"
            objects.append(obj)
            masks.append(mask)
        if all(visible_fraction(masks, i) >= MIN_VISIBLE for i in range(n)):
            break
    pixels = render_background(background, rng)
    for obj, mask in zip(objects, masks):  # paint in order: coverage is the alpha
        color = np.clip(np.array(COLORS[obj.color]) + rng.uniform(-10, 10, size=3), 0, 255)
        pixels = pixels * (1 - mask[:, :, None]) + color * mask[:, :, None]
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Scene(f"{split}_{index:06d}", split, index, background, objects, pixels)


def visible_fraction(masks, i):
    """How much of shape i is left once the shapes drawn after it are painted over."""
    cover = masks[i].copy()
    for later in masks[i + 1:]:
        cover *= 1 - later
    return float(cover.sum() / masks[i].sum())


# ---------------------------------------------------------------- symbolic record

def reading_order(objects):
    """Top row first, left to right: the order people list things in, used by every text."""
    return sorted(objects, key=lambda o: POSITIONS.index(o.position))


def make_captions(scene):
    """Five captions, varied like COCO's five human captions, all true of the picture."""
    objs = reading_order(scene.objects)
    n, bg = len(objs), scene.background
    sized = join_words([f"a {o.size} {o.category}" for o in objs])
    placed = join_words([f"a {o.category} {PHRASES[o.position]}" for o in objs])
    plain = join_words([f"a {o.category}" for o in objs])
    if n == 1:
        related = f"A single {objs[0].category} {PHRASES[objs[0].position]} of the picture."
    else:
        a, b = objs[0], objs[1]  # reading order: a is above b, or on the same row left of it
        same_row = POSITIONS.index(a.position) // 3 == POSITIONS.index(b.position) // 3
        related = f"A {a.category} {'to the left of' if same_row else 'above'} a {b.category}"
        related += f", plus {join_words([f'a {o.category}' for o in objs[2:]])}." if n > 2 else "."
    how_many = count(n, "shape")
    return [
        f"{sized[0].upper()}{sized[1:]} on a {bg} background.",
        f"{how_many.capitalize()}: {placed}.",
        related,
        f"A {bg} background with {sized}.",
        f"A simple picture of {plain}.",
    ]


def caps_boxes(scene):
    """The scene as LLaVA's caps_boxes JSONL line: what the language-only teacher may read."""
    return {"id": scene.id, "image": scene.image, "captions": make_captions(scene),
            "instances": [{"category": o.category, "bbox": o.bbox} for o in scene.objects]}


def png_bytes(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # zlib output is deterministic: same bytes each run
    return buf.getvalue()


# ---------------------------------------------------------------- sample sheet

def make_sample_sheet(records, image_folder, path, cols=4, rows=4, cell=192):
    """A PNG grid of images with their boxes drawn and their first caption underneath."""
    font = ImageFont.load_default()
    text_h = 64
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, rec in enumerate(records[: cols * rows]):
        x0, y0 = (k % cols) * cell, (k // cols) * (cell + text_h)
        img = Image.open(os.path.join(image_folder, rec["image"])).convert("RGB")
        sheet.paste(img.resize((cell, cell), Image.NEAREST), (x0, y0))  # NEAREST: show the real pixels
        for inst in rec["instances"]:
            x1, y1, x2, y2 = (v * cell for v in inst["bbox"])
            draw.rectangle([x0 + x1, y0 + y1, x0 + x2 - 1, y0 + y2 - 1], outline=(0, 230, 230))  # cyan: no object is cyan
        lines, line = [], ""
        for word in rec["captions"][0].split():  # wrap the caption to the cell's width
            if line and draw.textlength(f"{line} {word}", font=font) > cell - 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        draw.multiline_text((x0 + 3, y0 + cell + 2), "\n".join(lines + [line]), fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


# ---------------------------------------------------------------- build everything

def write_json(path, obj, jsonl=False):
    """Write atomically (temporary file + os.replace): a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def build_world(out_dir, n_train=4000, n_test=200, seed=0, progress=True):
    """Render the toy world and write all its data under `out_dir`; returns world.json's content.

    Writes images/{train,test}/*.png, caps_boxes_{train,test}.jsonl, pretrain.json (stage 1), places.json
    and instruct.json (stage 2, in two parts), lm_corpus.json (text-only, to pretrain a tiny LM),
    bench.jsonl (held-out short-answer questions), sample_sheet.png and world.json.
    """
    from tqdm import tqdm

    from . import teacher  # the teacher reads only the caps_boxes records made here

    caps = {}
    train_digests = set()
    for split, n in (("train", n_train), ("test", n_test)):
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        caps[split] = []
        for i in tqdm(range(n), desc=f"rendering {split}", disable=not progress):
            attempt = 0
            while True:  # a held-out image must never equal a training image
                scene = sample_scene(seed, split, i, attempt)
                data = png_bytes(scene.pixels)
                digest = hashlib.sha1(data).digest()
                if split == "train" or digest not in train_digests:
                    break
                attempt += 1
            if split == "train":
                train_digests.add(digest)
            with open(os.path.join(out_dir, "images", scene.image), "wb") as f:
                f.write(data)
            caps[split].append(caps_boxes(scene))
        write_json(os.path.join(out_dir, f"caps_boxes_{split}.jsonl"), caps[split], jsonl=True)

    files = {
        "pretrain.json": teacher.pretrain_records(caps["train"], seed),
        "instruct.json": teacher.instruct_records(caps["train"], seed),
        "places.json": teacher.places_records(caps["train"], seed),   # the toy stage 2's first part
        "lm_corpus.json": teacher.text_only_records(caps["train"], seed),
    }
    for name, records in files.items():
        write_json(os.path.join(out_dir, name), records)
    bench = teacher.bench_questions(caps["test"], seed)
    write_json(os.path.join(out_dir, "bench.jsonl"), bench, jsonl=True)
    if caps["train"]:
        make_sample_sheet(caps["train"], os.path.join(out_dir, "images"), os.path.join(out_dir, "sample_sheet.png"))

    kinds = {}
    for r in files["instruct.json"]:
        kind = r["id"].split("-")[1].rstrip("0123456789")   # quiz0, quiz1 -> quiz
        kinds[kind] = kinds.get(kind, 0) + 1
    info = {"version": VERSION, "seed": seed, "image_size": IMAGE_SIZE,
            "n_train": n_train, "n_test": n_test, "shapes": SHAPES, "colors": list(COLORS),
            "sizes": list(SIZES), "positions": POSITIONS, "backgrounds": BACKGROUNDS,
            "records": {name: len(r) for name, r in files.items()} | {"bench.jsonl": len(bench)},
            "instruct_kinds": kinds,
            "bench_categories": {c: sum(q["category"] == c for q in bench) for c in teacher.BENCH_CATEGORIES}}
    write_json(os.path.join(out_dir, "world.json"), info)
    return info

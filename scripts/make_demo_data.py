"""Build the bundled demo data: MMEB-train-style pairs over generated images.

    python scripts/make_demo_data.py [--out data/demo] [--n 200] [--scale 1] [--seed 0]

Writes OUT/pairs.jsonl and OUT/images/<subset>/*.png|jpg. Five subsets mimic
the kinds of MMEB-train tasks, with MMEB's prompt styles and `<|image_1|>`
markers:
  shapes_cls   image -> label (classification: a few labels shared by many queries)
  scenes_i2t   image -> caption
  scenes_t2i   caption -> image
  shapes_vqa   image + question -> answer (counting, colours, text drawn on the image)
  facts_t2t    text question -> text passage
About a third of the pairs carry an explicit hard negative (`neg_text`, and for
scenes_t2i `neg_image_path`). Everything derives from (seed, subset, index), so
the output is deterministic; `scale` multiplies the pair count with more
distinct pairs. A `.complete` marker makes a rerun with the same arguments free.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SUBSETS = ("shapes_cls", "scenes_i2t", "scenes_t2i", "shapes_vqa", "facts_t2t")
MARKER = ".complete"

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SKIES = {"blue": (110, 170, 235), "sunset": (245, 150, 90), "night": (20, 25, 70), "grey": (150, 155, 165)}
GROUNDS = {"grass": (70, 150, 60), "sand": (225, 200, 140), "snow": (240, 240, 245), "water": (40, 100, 170)}
OBJECTS = ("house", "tree", "car", "boat")
WORDS = ("STOP", "OPEN", "EXIT", "CAFE", "BOOK", "SALE", "PARK", "TAXI", "HOTEL", "BANK", "MILK", "RAIN")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def make(out_dir: Path, n_pairs: int = 200, seed: int = 0, scale: int = 1) -> Path:
    """Write the demo pairs under out_dir and return the path of pairs.jsonl."""
    out_dir = Path(out_dir)
    jsonl = out_dir / "pairs.jsonl"
    total = n_pairs * scale
    params = {"n_pairs": n_pairs, "seed": seed, "scale": scale, "rows": total}
    marker = out_dir / MARKER
    if marker.is_file() and jsonl.is_file() and json.loads(marker.read_text()) == params:
        return jsonl
    marker.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "images", ignore_errors=True)  # drop images of an earlier, different build
    builders = {
        "shapes_cls": _classification,
        "scenes_i2t": _image_to_caption,
        "scenes_t2i": _caption_to_image,
        "shapes_vqa": _vqa,
        "facts_t2t": _text_retrieval,
    }
    rows = []
    for s, subset in enumerate(SUBSETS):
        (out_dir / "images" / subset).mkdir(parents=True, exist_ok=True)
        count = total // len(SUBSETS) + (1 if s < total % len(SUBSETS) else 0)
        for i in range(count):
            rng = random.Random(f"{seed}:{subset}:{i}")
            row = {"qry": "", "qry_image_path": "", "pos_text": "", "pos_image_path": "",
                   "neg_text": "", "neg_image_path": ""}
            row.update(builders[subset](rng, i, out_dir, f"images/{subset}/{i:05d}"))
            rows.append({"subset": subset, **row})
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(jsonl)
    marker.write_text(json.dumps(params))
    return jsonl


# --------------------------------------------------------------------------- subsets


def _classification(rng, i, out: Path, stem: str) -> dict:
    label = SHAPES[i % len(SHAPES)]
    im = _canvas(rng, 96)
    color = rng.choice([c for c in COLORS if c != "white"])
    _draw_shape(ImageDraw.Draw(im), label, COLORS[color], rng, 96)
    row = {
        "qry": "<|image_1|>\nRepresent the given image for classification",
        "qry_image_path": _save(im, out, stem + ".png"),
        "pos_text": label,
    }
    if i % 3 == 0:  # the hard negative is another label
        row["neg_text"] = SHAPES[(i + 1 + rng.randrange(len(SHAPES) - 1)) % len(SHAPES)]
    return row


def _image_to_caption(rng, i, out: Path, stem: str) -> dict:
    scene = _scene(rng)
    row = {
        "qry": "<|image_1|>\nFind an image caption describing the given everyday image.",
        "qry_image_path": _save(_draw_scene(scene, rng), out, stem + ".jpg"),
        "pos_text": _caption(scene),
    }
    if i % 3 == 0:
        row["neg_text"] = _caption(_perturb(scene, rng))
    return row


def _caption_to_image(rng, i, out: Path, stem: str) -> dict:
    scene = _scene(rng)
    row = {
        "qry": f"Find me an everyday image that matches the given caption: {_caption(scene)}",
        "pos_text": "<|image_1|>\nRepresent the given image.",
        "pos_image_path": _save(_draw_scene(scene, rng), out, stem + ".jpg"),
    }
    if i % 3 == 0:  # a picture of a slightly different scene
        row["neg_text"] = "<|image_1|>\nRepresent the given image."
        row["neg_image_path"] = _save(_draw_scene(_perturb(scene, rng), rng), out, stem + "_neg.jpg")
    return row


def _vqa(rng, i, out: Path, stem: str) -> dict:
    im = _canvas(rng, 128)
    draw = ImageDraw.Draw(im)
    kind = i % 3
    if kind == 0:  # counting
        shape, n = rng.choice(SHAPES[:4]), rng.randint(1, 5)
        for _ in range(n):
            _draw_shape(draw, shape, COLORS[rng.choice(["red", "blue", "green", "purple"])], rng, 128, small=True)
        question, answer = f"How many {shape}s are in the picture?", NUMBER_WORDS[n]
        wrong = NUMBER_WORDS[n % 5 + 1]
    elif kind == 1:  # colour
        shape, color = rng.choice(SHAPES), rng.choice(["red", "blue", "green", "yellow", "purple", "orange"])
        _draw_shape(draw, shape, COLORS[color], rng, 128)
        question, answer = f"What color is the {shape}?", color
        wrong = rng.choice([c for c in ("red", "blue", "green") if c != color])
    else:  # reading text drawn on a sign
        word = rng.choice(WORDS)
        draw.rectangle([14, 40, 114, 88], fill=COLORS["white"], outline=COLORS["black"], width=3)
        draw.text((64, 64), word, fill=COLORS["black"], font=_font(22), anchor="mm")
        question, answer = "What word is written on the sign?", word.lower()
        wrong = rng.choice([w for w in WORDS if w != word]).lower()
    row = {
        "qry": f"<|image_1|>\nRepresent the given image with the following question: {question}",
        "qry_image_path": _save(im, out, stem + ".png"),
        "pos_text": answer,
    }
    if i % 4 == 1:
        row["neg_text"] = wrong
    return row


def _text_retrieval(rng, i, out: Path, stem: str) -> dict:
    prompt = "Given a question, retrieve passages that answer the question: "
    kind = i % 3
    if kind == 0:
        a, b = 10 + i, rng.randint(1, 999)
        question = f"What is {a} plus {b}?"
        passage, wrong = f"Adding {a} and {b} gives {a + b}.", f"Adding {a} and {b} gives {a + b + 10}."
    elif kind == 1:
        word = "".join(rng.choice("bcdfglmnprstvz") + rng.choice("aeiou") for _ in range(2 + i % 4)) + str(i)
        question = f"How many characters are in the code word '{word}'?"
        passage, wrong = f"The code word '{word}' is {len(word)} characters long.", f"The code word '{word}' is {len(word) + 1} characters long."
    else:
        shape = SHAPES[i % len(SHAPES)]
        color = rng.choice(list(COLORS))
        question = f"In puzzle number {i}, what shape is the {color} piece?"
        passage = f"Puzzle {i} uses a {color} {shape} as its key piece."
        wrong = f"Puzzle {i} uses a {color} {SHAPES[(i + 1) % len(SHAPES)]} as its key piece."
    row = {"qry": prompt + question, "pos_text": passage}
    if i % 3 == 2:
        row["neg_text"] = wrong
    return row


# --------------------------------------------------------------------------- drawing


def _canvas(rng, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill, rng, size: int, small: bool = False) -> None:
    r = rng.randint(size // 12, size // 8) if small else rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = math.pi * k / 5 - math.pi / 2
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # cross
        w = max(2, r // 3)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)


def _ground(obj: str, rng) -> str:
    return "water" if obj == "boat" else rng.choice(["grass", "sand", "snow"])


def _scene(rng) -> dict:
    obj = rng.choice(OBJECTS)
    return {
        "sky": rng.choice(list(SKIES)),
        "ground": _ground(obj, rng),
        "object": obj,
        "count": rng.randint(1, 3),
        "color": rng.choice(["red", "blue", "yellow", "purple", "orange", "white"]),
        "light": rng.choice(["sun", "moon", "clouds"]),
    }


def _perturb(scene: dict, rng) -> dict:
    """The same scene with one attribute changed: a hard negative."""
    key = rng.choice(["sky", "object", "count", "color"])
    options = {"sky": list(SKIES), "object": list(OBJECTS), "count": [1, 2, 3],
               "color": ["red", "blue", "yellow", "purple", "orange", "white"]}[key]
    changed = {**scene, key: rng.choice([o for o in options if o != scene[key]])}
    if key == "object" and "boat" in (scene["object"], changed["object"]):
        changed["ground"] = _ground(changed["object"], rng)
    return changed


def _caption(scene: dict) -> str:
    count = NUMBER_WORDS[scene["count"]]
    noun = scene["object"] + ("s" if scene["count"] > 1 else "")
    article = ("An" if scene["color"][0] in "aeiou" else "A") if scene["count"] == 1 else count.capitalize()
    light = {"sun": "with the sun shining", "moon": "with the moon out", "clouds": "with clouds"}[scene["light"]]
    sky = {"blue": "a clear blue sky", "sunset": "a sunset sky", "night": "a night sky", "grey": "a grey sky"}
    return f"{article} {scene['color']} {noun} on {scene['ground']} under {sky[scene['sky']]} {light}."


def _draw_scene(scene: dict, rng, size: int = 128) -> Image.Image:
    im = Image.new("RGB", (size, size), SKIES[scene["sky"]])
    draw = ImageDraw.Draw(im)
    horizon = size * 2 // 3
    draw.rectangle([0, horizon, size, size], fill=GROUNDS[scene["ground"]])
    if scene["light"] == "sun":
        draw.ellipse([size - 34, 6, size - 10, 30], fill=COLORS["yellow"])
    elif scene["light"] == "moon":
        draw.ellipse([size - 30, 8, size - 12, 26], fill=(235, 235, 210))
    else:
        for x in (16, 52, 84):
            draw.ellipse([x, 10, x + 30, 26], fill=(235, 235, 240))
    fill = COLORS[scene["color"]]
    slot = size // scene["count"]
    for k in range(scene["count"]):
        x = k * slot + slot // 2 + rng.randint(-4, 4)
        _draw_object(draw, scene["object"], x, horizon + 6, fill)
    return im


def _draw_object(draw: ImageDraw.ImageDraw, obj: str, x: int, base: int, fill) -> None:
    if obj == "house":
        draw.rectangle([x - 14, base - 24, x + 14, base], fill=fill, outline=(40, 30, 30))
        draw.polygon([(x - 18, base - 24), (x, base - 40), (x + 18, base - 24)], fill=(120, 50, 40))
    elif obj == "tree":
        draw.rectangle([x - 3, base - 18, x + 3, base], fill=(110, 70, 30))
        draw.ellipse([x - 14, base - 44, x + 14, base - 14], fill=fill)
    elif obj == "car":
        draw.rectangle([x - 18, base - 16, x + 18, base - 4], fill=fill)
        draw.rectangle([x - 10, base - 24, x + 8, base - 16], fill=fill)
        for wx in (x - 11, x + 11):
            draw.ellipse([wx - 5, base - 8, wx + 5, base + 2], fill=COLORS["black"])
    else:  # boat
        draw.polygon([(x - 20, base - 12), (x + 20, base - 12), (x + 12, base), (x - 12, base)], fill=fill)
        draw.line([x, base - 12, x, base - 40], fill=COLORS["black"], width=2)
        draw.polygon([(x + 1, base - 40), (x + 16, base - 16), (x + 1, base - 16)], fill=(245, 245, 245))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _save(im: Image.Image, out: Path, rel: str) -> str:
    path = out / rel
    if rel.endswith(".jpg"):
        im.save(path, format="JPEG", quality=85)
    else:
        im.save(path, format="PNG")
    return rel


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo", type=Path)
    ap.add_argument("--n", default=200, type=int, help="pairs at scale 1")
    ap.add_argument("--scale", default=1, type=int, help="multiplies the pair count (benchmarks: 1, 4, 10)")
    ap.add_argument("--seed", default=0, type=int)
    args = ap.parse_args(argv)
    path = make(args.out, n_pairs=args.n, seed=args.seed, scale=args.scale)
    print(f"{sum(1 for _ in open(path))} pairs in {path}")


if __name__ == "__main__":
    main()

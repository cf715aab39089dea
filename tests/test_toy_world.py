"""The toy world: reproducible images, boxes that match pixels, valid LLaVA data, true answers."""
import hashlib
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image

from minillava.constants import IMAGE_PLACEHOLDER
from minillava.data import validate_record
from minillava.prompts import BRIEF_DESCRIPTION
from minillava.toy import reasoning, teacher, world
from minillava.toy.teacher import SHORT_ANSWER, normalize_answer

N_TRAIN, N_TEST = 24, 12


def build(root, seed):
    world.build_world(str(root), n_train=N_TRAIN, n_test=N_TEST, seed=seed, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("world_a"), seed=0)


def read_tree(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(built, tmp_path):
    first = read_tree(built)
    again = read_tree(build(tmp_path / "again", seed=0))
    assert first.keys() == again.keys()
    assert all(first[k] == again[k] for k in first), [k for k in first if first[k] != again[k]]
    other = read_tree(build(tmp_path / "other", seed=1))
    assert other["images/train/000000.png"] != first["images/train/000000.png"]
    assert other["pretrain.json"] != first["pretrain.json"]


def test_a_scene_can_be_remade_alone():
    a, b = world.sample_scene(7, "train", 3), world.sample_scene(7, "train", 3)
    assert world.png_bytes(a.pixels) == world.png_bytes(b.pixels)
    assert world.caps_boxes(a) == world.caps_boxes(b)


def test_written_files_and_counts(built):
    for name in ["caps_boxes_train.jsonl", "caps_boxes_test.jsonl", "pretrain.json", "instruct.json",
                 "places.json", "lm_corpus.json", "bench.jsonl", "sample_sheet.png", "world.json"]:
        assert os.path.exists(os.path.join(built, name)), name
    assert len(os.listdir(os.path.join(built, "images", "train"))) == N_TRAIN
    assert len(os.listdir(os.path.join(built, "images", "test"))) == N_TEST
    with open(os.path.join(built, "world.json")) as f:
        info = json.load(f)
    assert info["seed"] == 0 and info["n_train"] == N_TRAIN and info["records"]["pretrain.json"] == N_TRAIN
    with Image.open(os.path.join(built, "images", "train", "000000.png")) as img:
        assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and img.mode == "RGB"


def test_boxes_match_drawn_pixels():
    # Single shapes on plain backgrounds: every pixel far from the background is the shape.
    seen = set()
    for i in range(300):
        scene = world.sample_scene(0, "box-check", i)
        if len(scene.objects) != 1 or not scene.background.startswith("plain"):
            continue
        obj = scene.objects[0]
        pixels = scene.pixels.astype(int)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(pixels - background).max(axis=2) > 40)
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        box_px = np.array(obj.bbox) * world.IMAGE_SIZE
        assert np.abs(box_px - extent).max() <= 1.5, (i, obj, extent)
        seen.add(obj.shape)
    assert seen == set(world.SHAPES)


def test_scenes_follow_the_world_rules():
    for i in range(100):
        scene = world.sample_scene(0, "rules", i)
        objs = scene.objects
        assert 1 <= len(objs) <= world.MAX_OBJECTS
        assert len({o.category for o in objs}) == len(objs)  # "the red circle" names one object
        assert len({o.position for o in objs}) == len(objs)  # and so does "in the top left"
        for o in objs:
            x1, y1, x2, y2 = o.bbox
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert (x2 - x1 > world.SIZE_THRESHOLD) == (o.size == "large")


def test_visible_fraction_counts_what_later_shapes_hide():
    left = world.shape_mask("square", (10, 10, 30, 30))
    right = world.shape_mask("square", (20, 10, 40, 30))  # covers the right half of `left`
    assert world.visible_fraction([left, right], 0) == pytest.approx(0.5, abs=0.05)
    assert world.visible_fraction([left, right], 1) == 1.0


def test_every_record_is_valid_llava_json_and_its_image_exists(built):
    image_first = image_last = 0
    for name in ["pretrain.json", "instruct.json", "lm_corpus.json"]:
        with open(os.path.join(built, name)) as f:
            records = json.load(f)
        assert len({r["id"] for r in records}) == len(records), f"{name}: ids must be unique"
        for i, r in enumerate(records):
            validate_record(r, f"{name} record {i}")
            if "image" in r:
                assert os.path.exists(os.path.join(built, "images", r["image"]))
                first = r["conversations"][0]["value"]
                image_first += first.startswith(IMAGE_PLACEHOLDER + "\n")
                image_last += first.endswith("\n" + IMAGE_PLACEHOLDER)
    assert image_first and image_last  # both placements occur, as in the paper's data


def test_record_mix(built):
    with open(os.path.join(built, "lm_corpus.json")) as f:
        assert all("image" not in r for r in json.load(f))
    with open(os.path.join(built, "instruct.json")) as f:
        kinds = [r["id"].split("-")[1].rstrip("0123456789") for r in json.load(f)]  # quiz0, quiz1 -> quiz
    paper = {k: round(N_TRAIN * per_80 / 80 / 2) for k, per_80 in  # half the paper's 158 per 80 images
             (("conversation", 58), ("detail", 23), ("complex", 77))}
    places = round(sum(paper.values()) * 0.2)                         # 5 on 24 images
    text = round((sum(paper.values()) + places) * 0.05 / 0.95)         # 2: 5% of all records
    images = [[i["category"].split() for i in r["instances"]]         # [["red", "circle"], ...] per image
              for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))]
    several = sum(len(n) > 1 for n in images)
    quiz = teacher.QUIZ_PER_IMAGE * several                           # quizzes per image of 2+ shapes
    colors = [[c for c, _ in n] for n in images]
    twins = teacher.TWINS_PER_IMAGE * sum(len(set(c)) < len(c) for c in colors)  # where two shapes share a colour
    alone = sum(len(n) > 1 and any([c for c, _ in n].count(c) == 1 or [k for _, k in n].count(k) == 1 for c, k in n)
                for n in images)                                      # images where one word names a shape
    assert {k: kinds.count(k) for k in set(kinds)} == {**paper, "places": places, "text": text, "quiz": quiz,
                                                       "kinds": several, "twins": twins, "alone": alone}
    with open(os.path.join(built, "pretrain.json")) as f:
        caps = {r["id"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))}
        for r in json.load(f):
            human, gpt = (t["value"] for t in r["conversations"])
            assert human.replace(IMAGE_PLACEHOLDER, "").strip() in BRIEF_DESCRIPTION
            assert gpt in caps[r["id"]]["captions"]


def test_places_records_pair_every_shape_with_its_cell_in_shuffled_order(built):
    caps = {r["image"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))}
    with open(os.path.join(built, "instruct.json")) as f:
        records = [r for r in json.load(f) if r["id"].split("-")[1] in ("places", "kinds")]
    with open(os.path.join(built, "places.json")) as f:
        first_part = json.load(f)                    # the toy stage 2's first part: lists of every image twice,
    lists_alone = [r for r in first_part if "-lists-" in r["id"]]          # and half the images described
    described = [r for r in first_part if r["id"].endswith("-detail")]
    assert sorted(r["image"] for r in lists_alone) == sorted(list(caps) * 2)
    assert len(described) == round(len(caps) / 2) == len({r["image"] for r in described})
    assert len(lists_alone) + len(described) == len(first_part)
    assert all(t["value"] == teacher.describe(*teacher.read_record(caps[r["image"]])) for r in described
               for t in r["conversations"][1::2])
    orders = set()
    for r in records + lists_alone:
        where = {i["category"]: world.grid_position(i["bbox"]) for i in caps[r["image"]]["instances"]}
        for question, answer in zip(*[iter(t["value"] for t in r["conversations"])] * 2):
            items = [item.split() for item in answer.rstrip(".").split(". ")]
            if "as kind, colour, then place" in question:                # "square red top left"
                named = [(f"{w[1]} {w[0]}", " ".join(w[2:])) for w in items]
                assert sorted(named) == sorted(where.items())
                continue
            first, width = "place" if "as place then" in question else "name", 1 if "kind" in question else 2
            # "red circle top left": the name is two words, the place the rest; a kind alone is one word
            pairs = [(" ".join(w[:width]), " ".join(w[width:])) if first == "name" else
                     (" ".join(w[-width:]), " ".join(w[:-width])) for w in items]
            if "kind" in question:                                        # the kind alone, "top square"
                assert sorted(pairs) == sorted((name.split()[1], place) for name, place in where.items())
                continue
            assert dict(pairs) == where and len(pairs) == len(where)      # every shape once, at its cell
            orders.add([name for name, _ in pairs] == sorted(where, key=lambda n: world.POSITIONS.index(where[n])))
    assert orders == {True, False}        # sometimes reading order, sometimes not: the list must be read by name


def test_the_quizzes_ask_about_every_shape_once_as_the_bench_asks(built):
    caps = {r["image"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))}
    with open(os.path.join(built, "instruct.json")) as f:
        records = [r for r in json.load(f) if re.search(r"-quiz\d$", r["id"])]
    several = [i for i, r in caps.items() if len(r["instances"]) > 1]
    assert teacher.QUIZ_PER_IMAGE > 1
    assert sorted(r["image"] for r in records) == sorted(several * teacher.QUIZ_PER_IMAGE)
    kinds, drawn = set(), {}
    for r in records:
        objs, _ = teacher.read_record(caps[r["image"]])
        by_place = {o.where: o for o in objs}
        turns = [t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in r["conversations"]]
        asked = []
        for question, answer in zip(turns[::2], turns[1::2]):
            assert question.endswith(SHORT_ANSWER)
            name = re.fullmatch(r"Where is the (\w+ \w+)\?", question[:-len(SHORT_ANSWER)])
            place = re.fullmatch(r"What (color|shape) is (?:the shape )?(.+)\?", question[:-len(SHORT_ANSWER)])
            if name:
                o = next(o for o in objs if o.name == name[1])
                assert answer == o.position
            else:
                o = by_place[place[2]]
                assert answer == getattr(o, place[1])
            kinds.add("position" if name else place[1])
            asked.append(o)
        assert sorted(map(id, asked)) == sorted(map(id, objs))          # every shape once
        drawn.setdefault(r["image"], []).append(turns)
    assert kinds == {"position", "color", "shape"}
    assert any(len(set(map(str, quizzes))) > 1 for quizzes in drawn.values())  # an image's quizzes are new draws


def test_twins_ask_where_every_shape_that_shares_its_color_is(built):
    caps = {r["image"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))}
    with open(os.path.join(built, "instruct.json")) as f:
        records = [r for r in json.load(f) if re.search(r"-twins\d$", r["id"])]
    assert records
    for r in records:
        objs, _ = teacher.read_record(caps[r["image"]])
        shared = {o.name: o.position for o in objs if [p.color for p in objs].count(o.color) > 1}
        turns = [t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in r["conversations"]]
        asked = {re.fullmatch(r"Where is the (\w+ \w+)\?", q[:-len(SHORT_ANSWER)])[1]: a for q, a in zip(turns[::2], turns[1::2])}
        assert asked == shared and len(turns) == 2 * len(shared)       # each of them once, at its cell


def test_alone_asks_where_every_shape_one_word_names_is(built):
    caps = {r["image"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))}
    with open(os.path.join(built, "instruct.json")) as f:
        records = [r for r in json.load(f) if r["id"].endswith("-alone")]
    forms = set()
    for r in records:
        objs, _ = teacher.read_record(caps[r["image"]])
        turns = [t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in r["conversations"]]
        asked = []
        for question, answer in zip(turns[::2], turns[1::2]):
            word = re.fullmatch(r"Where is the (\w+)(?: shape)?\?", question[:-len(SHORT_ANSWER)])[1]
            o, = [o for o in objs if word in (o.color, o.shape)]      # the one shape that word names
            assert answer == o.position and question.endswith(SHORT_ANSWER)
            forms.add("kind" if word in world.SHAPES else "color")
            asked.append(o)
        named = [o for o in objs if [p.shape for p in objs].count(o.shape) == 1 or
                 [p.color for p in objs].count(o.color) == 1]
        assert sorted(map(id, asked)) == sorted(map(id, named))        # each such shape once
    assert forms == {"kind", "color"}
    objs, _ = teacher.read_record({"captions": ["on a plain light gray background"], "instances": [
        {"category": "red circle", "bbox": [0.05, 0.05, 0.25, 0.25]}, {"category": "red circle", "bbox": [0.4, 0.7, 0.6, 0.9]}]})
    assert teacher.alone(objs, random.Random(0)) == []                  # no word names one of two red circles


def test_splits_share_no_image(built):
    digests = {split: {hashlib.sha1(data).hexdigest() for data in read_tree(os.path.join(built, "images", split)).values()}
               for split in ("train", "test")}
    assert len(digests["train"]) == N_TRAIN and not digests["train"] & digests["test"]
    ids = [{r["id"] for r in load_jsonl(os.path.join(built, f"caps_boxes_{s}.jsonl"))} for s in ("train", "test")]
    assert not ids[0] & ids[1]


def test_text_only_answers_equal_image_answers(built):
    record = load_jsonl(os.path.join(built, "caps_boxes_train.jsonl"))[1]
    for kind in ["short", "full", "detail", "complex", "brief"]:
        seeing = teacher.make_record(kind, record, "r", teacher.record_rng(0, "r"))
        told = teacher.make_record(kind, record, "r", teacher.record_rng(0, "r"), text_only=True)
        assert [t["value"] for t in seeing["conversations"][1::2]] == [t["value"] for t in told["conversations"][1::2]]
        assert "image" not in told and IMAGE_PLACEHOLDER not in json.dumps(told)


def test_round_versus_angular_answers_count_and_conclude_right():
    record = {"captions": ["A red circle on a plain light gray background."], "instances": [
        {"category": "red circle", "bbox": [0.05, 0.05, 0.2, 0.2]}, {"category": "blue square", "bbox": [0.7, 0.7, 0.9, 0.9]}]}
    objs, _ = teacher.read_record(record)
    for shapes, end in [(objs, "Both numbers are one, so no, there are as many round shapes as angular ones."),
                        (objs[:1], "One is more than zero, so yes, there are more round shapes than angular ones."),
                        (objs[1:], "Zero is fewer than one, so no, there are fewer round shapes than angular ones.")]:
        assert reasoning.r_round(shapes, None)[1].endswith(end)


def test_bench_answers_agree_with_caps_boxes(built):
    caps = {r["image"]: r for r in load_jsonl(os.path.join(built, "caps_boxes_test.jsonl"))}
    bench = load_jsonl(os.path.join(built, "bench.jsonl"))
    assert {q["category"] for q in bench} == set(teacher.BENCH_CATEGORIES)
    assert len({q["question_id"] for q in bench}) == len(bench)
    for q in bench:
        assert q["text"].endswith(SHORT_ANSWER) and q["image"].startswith("test/")
        text, instances = q["text"][: -len(SHORT_ANSWER)], caps[q["image"]]["instances"]
        at = {world.PHRASES[world.grid_position(i["bbox"])]: i["category"] for i in instances}
        where = {i["category"]: world.grid_position(i["bbox"]) for i in instances}
        if q["category"] == "count":
            assert q["answer"] == str(len(instances))
        elif q["category"] == "color":
            assert at[re.fullmatch(r"What color is the shape (.+)\?", text)[1]].split()[0] == q["answer"]
        elif q["category"] == "shape":
            assert at[re.fullmatch(r"What shape is (.+)\?", text)[1]].split()[1] == q["answer"]
        elif q["category"] == "position":
            assert where[re.fullmatch(r"Where is the (.+)\?", text)[1]] == q["answer"]
        else:
            m = re.fullmatch(r"Is the (.+) (to the left of|above) the (.+)\?", text)
            a, b = (world.POSITIONS.index(where[m[k]]) for k in (1, 3))
            truth = a % 3 < b % 3 if m[2] == "to the left of" else a // 3 < b // 3
            assert q["answer"] == ("yes" if truth else "no")


def test_normalize_answer():
    assert normalize_answer("Three") == "3"
    assert normalize_answer("3") == "3"
    assert normalize_answer("The Top-Left.") == "top left"
    assert normalize_answer("  a Red circle! ") == "red circle"
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("bottom right") == "bottom right"

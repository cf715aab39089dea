"""A rule-based stand-in for GPT-4 (paper section 3) that writes the toy world's instruction data.

Like GPT-4 in the paper, the teacher never sees pixels: it reads the symbolic caps_boxes record (captions + one
box per object) and writes the three response types: conversation, detailed description and complex reasoning.
It also writes stage-1 captions, "places" and "kinds" lists and "quiz", "twins" and "alone" questions (LLaVA-1.5's
region-level and short-answer data in miniature), text-only records (the scene told in words, for LM pretraining
and the ShareGPT-like share of stage 2) and the held-out benchmark. Answers follow fixed patterns a tiny model can learn; questions ask only what the
record answers for certain.
"""
import random
import re
from dataclasses import dataclass

from ..constants import IMAGE_PLACEHOLDER
from ..prompts import BRIEF_DESCRIPTION, DETAILED_DESCRIPTION
from .reasoning import reason
from .world import (BACKGROUNDS, COLORS, NUMBER_WORDS, PHRASES, POSITIONS, SHAPES,
                    SIZE_THRESHOLD, count, grid_position, join_words)

# LLaVA-1.5's suffix for short-answer data (VQAv2, GQA, ... in mix665k) and for its benchmarks.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
PAPER_MIX = {"conversation": 58, "detail": 23, "complex": 77}  # llava_instruct_158k: thousands, on ~80K images
PAPER_IMAGES, PAPER_SCALE = 80, 0.5  # the toy writes half as many per image (~1), to leave time for the quiz
QUIZ_PER_IMAGE = 3         # quiz records per training image of 2+ shapes (mix665k's short-answer VQA, see quiz())
TWINS_PER_IMAGE = 2        # "twins" records per image where two shapes share a colour (see twins())
TEXT_ONLY_FRACTION = 0.05  # share of text-only records in instruct.json (mix665k's ShareGPT part)
PLACES_FRACTION = 0.2      # "places" records per image record (mix665k's region-level part, see places())
BENCH_CATEGORIES = ["count", "color", "shape", "position", "relation"]
INTROS = ["Picture this: {}.", "Imagine an image with {}.", "Suppose a picture shows {}.", "Consider an image containing {}."]


@dataclass
class Obj:
    name: str      # its category, "red circle"
    color: str
    shape: str
    size: str      # read off the box width
    position: str  # one of POSITIONS, read off the box centre
    where: str     # the position inside a sentence, "in the top left"
    row: int       # 0..2 on the 3x3 grid
    col: int
    cx: float      # box centre, normalized
    cy: float


def read_record(record):
    """What the teacher 'sees': objects from the boxes and the background named in the captions."""
    objs = []
    for inst in record["instances"]:
        color, shape = inst["category"].split()
        x1, y1, x2, y2 = inst["bbox"]
        size = "large" if x2 - x1 > SIZE_THRESHOLD else "small"
        pos = grid_position(inst["bbox"])
        k = POSITIONS.index(pos)
        objs.append(Obj(inst["category"], color, shape, size, pos, PHRASES[pos], k // 3, k % 3, (x1 + x2) / 2, (y1 + y2) / 2))
    objs.sort(key=lambda o: (o.row, o.col))  # reading order, as in the captions
    captions = " ".join(record["captions"])
    background = next(b for b in BACKGROUNDS if f"{b} background" in captions)
    return objs, background


def be(n):
    return "is" if n == 1 else "are"


# ---------------------------------------------------------------- conversation questions
# Each returns (question, short answer, full-sentence answer), or None when it does not apply.
# The bench asks the first five in their short form, so training and test phrasing agree.

def q_count(objs, rng):
    n = len(objs)
    return "How many shapes are there in the image?", str(n), f"There {be(n)} {count(n, 'shape')} in the image."


def q_color(objs, rng):
    o = rng.choice(objs)  # grid cells are distinct, so a position names one shape
    return f"What color is the shape {o.where}?", o.color, f"The {o.shape} {o.where} is {o.color}."


def q_shape(objs, rng):
    o = rng.choice(objs)
    return f"What shape is {o.where}?", o.shape, f"The shape {o.where} is a {o.name}."


def q_position(objs, rng):
    o = rng.choice(objs)
    return f"Where is the {o.name}?", o.position, f"The {o.name} is {o.where} of the image."


def q_relation(objs, rng):
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)  # random order: "yes" and "no" equally often
    # Different cells differ in column or row; ask only about the axis that differs.
    if a.col != b.col and (a.row == b.row or rng.random() < 0.5):
        yes = a.col < b.col
        full = f"Yes, the {a.name} is to the left of the {b.name}." if yes else f"No, the {a.name} is to the right of the {b.name}."
        return f"Is the {a.name} to the left of the {b.name}?", "yes" if yes else "no", full
    yes = a.row < b.row
    full = f"Yes, the {a.name} is above the {b.name}." if yes else f"No, the {a.name} is below the {b.name}."
    return f"Is the {a.name} above the {b.name}?", "yes" if yes else "no", full


def q_count_kind(objs, rng):
    if rng.random() < 0.5:  # a colour or a shape that may be absent: "0" is definite too
        kind = rng.choice(list(COLORS))
        n, noun = sum(o.color == kind for o in objs), kind + " shape"
    else:
        kind = rng.choice(SHAPES)
        n, noun = sum(o.shape == kind for o in objs), kind
    return f"How many {noun}s are there?", str(n), f"There {be(n)} {count(n, noun)} in the image."


def q_size(objs, rng):
    o = rng.choice(objs)
    return f"Is the {o.name} large or small?", o.size, f"The {o.name} is {o.size}."


def q_exists(objs, rng):
    names = {o.name for o in objs}
    if rng.random() < 0.5:
        o = rng.choice(objs)
        return f"Is there a {o.name} in the image?", "yes", f"Yes, there is a {o.name} {o.where}."
    name = rng.choice([f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in names])
    return f"Is there a {name} in the image?", "no", f"No, there is no {name} in the image."


QUESTIONS = [q_count, q_color, q_shape, q_position, q_relation, q_count_kind, q_size, q_exists]


def conversation(objs, rng, short):
    """3-5 distinct Q/A pairs; `short` selects LLaVA-1.5's single-word style for every turn."""
    want, pairs, seen = rng.randint(3, 5), [], set()
    for make in rng.sample(QUESTIONS, len(QUESTIONS)) * 2:
        qa = make(objs, rng)
        if qa is None or qa[0] in seen:
            continue
        seen.add(qa[0])
        pairs.append((qa[0] + SHORT_ANSWER, qa[1]) if short else (qa[0], qa[2]))
        if len(pairs) == want:
            break
    return pairs


# ---------------------------------------------------------------- places and quiz: every shape and its cell
# LLaVA-1.5's mix665k adds region-level data (RefCOCO, Visual Genome) pairing objects with where they are.
# The toy lists every shape with its place, and every place with its shape, in a new order each time; the place
# follows the name directly ("red circle top left."), as `python -m minillava.toy.probe --lookup-task` shows the lookup
# needs. List 3 puts the colour after the kind ("square red top left."), so that the kind word, too, must find its
# shape; list 4 names kinds alone. The four share one record, so a later list can be copied from an earlier one
# (docs/toy-world.md, "Why part 1 does not teach the lookup"). The quiz asks the bench's questions (short-answer VQA);
# "kinds" records hold list 3 alone, "twins" ask where each shape that shares its colour is, and "alone" where each
# shape is that its kind or its colour alone names (records of their own: nothing to copy from).
KIND_LIST = "List the kind of every shape with its colour and place, as kind, colour, then place."
PLACES_BY_NAME = "List every shape with its place in the image, as shape then place."  # also the probe's question
PLACE_LISTS = [(PLACES_BY_NAME, "name", "position"),
               ("List what is in each occupied part of the image, as place then shape.", "position", "name"),
               (KIND_LIST, "shape", "color", "position"),
               ("List the kind of shape in each occupied part of the image, as place then kind.", "position", "shape")]


def place_list(objs, rng, question, *fields):  # fields ("shape", "color", "position") -> "square red top left. ..."
    return question, ". ".join(" ".join(getattr(o, f) for f in fields) for o in rng.sample(objs, len(objs))) + "."


def places(objs, rng):
    pairs = [place_list(objs, rng, *fields) for fields in PLACE_LISTS]   # a new order for each list
    return rng.sample(pairs, len(pairs))


def twins(objs, rng):
    """Where is each shape that shares its color with another: the color word alone cannot place it."""
    shared = [o for o in objs if [p.color for p in objs].count(o.color) > 1]
    return [(q_position([o], rng)[0] + SHORT_ANSWER, o.position) for o in rng.sample(shared, len(shared))]


def alone(objs, rng):
    """Where is each shape that one word names, its kind or its colour ("Where is the square?", "Where is the red
    shape?"): the answer must follow that word's lookup alone."""
    kinds, colors = [o.shape for o in objs], [o.color for o in objs]
    pairs = []
    for o in rng.sample(objs, len(objs)):
        forms = ([f"the {o.shape}"] if kinds.count(o.shape) == 1 else []) + \
                ([f"the {o.color} shape"] if colors.count(o.color) == 1 else [])
        if forms:
            pairs.append((f"Where is {rng.choice(forms)}?{SHORT_ANSWER}", o.position))
    return pairs


def quiz(objs, rng):
    """LLaVA-1.5's short-answer VQA in miniature: every shape in turn asked one of the bench's binding questions."""
    asks = [rng.choice([q_color, q_shape, q_position])([o], rng) for o in rng.sample(objs, len(objs))]
    return [(question + SHORT_ANSWER, short) for question, short, _ in asks]


# ---------------------------------------------------------------- detailed description

def relation(a, b):
    """A sentence placing a against b; a comes first in reading order."""
    if a.row == b.row:
        return f"The {a.name} is to the left of the {b.name}."
    side = "" if a.col == b.col else " and to the left of" if a.col < b.col else " and to the right of"
    return f"The {a.name} is above{side} the {b.name}."


def describe(objs, background):
    n, large = len(objs), sum(o.size == "large" for o in objs)
    text = [f"The image shows {count(n, 'shape')} on a {background} background."]
    text += [f"{o.where[0].upper()}{o.where[1:]} there is a {o.size} {o.name}." for o in objs]
    text += [relation(a, b) for a, b in zip(objs, objs[1:])]
    if n == 1:
        text.append(f"The {objs[0].name} is the only shape in the picture.")
    elif large in (0, n):
        text.append(f"{'Both' if n == 2 else 'All ' + NUMBER_WORDS[n]} shapes are {'large' if large else 'small'}.")
    else:
        text.append(f"{NUMBER_WORDS[large].capitalize()} of them {be(large)} large and {NUMBER_WORDS[n - large]} {be(n - large)} small.")
    colors = [c for c in COLORS if any(o.color == c for o in objs)]
    text.append(f"The color{'s' if len(colors) > 1 else ''} used {be(len(colors))} {join_words(colors)}.")
    return " ".join(text)


# ---------------------------------------------------------------- LLaVA JSON records

def respond(kind, record, rng):
    """The (question, answer) pairs of one record of `kind`, from the symbolic record only."""
    objs, background = read_record(record)
    if kind == "brief":  # stage 1: a brief-description prompt answered by a caption
        return [(rng.choice(BRIEF_DESCRIPTION), rng.choice(record["captions"]))]
    if kind == "detail":
        return [(rng.choice(DETAILED_DESCRIPTION), describe(objs, background))]
    if kind == "complex":
        return [reason(objs, rng)]
    if kind in ("places", "quiz", "twins", "alone"):  # LLaVA-1.5's region-level and short-answer data, in miniature
        return {"places": places, "quiz": quiz, "twins": twins, "alone": alone}[kind](objs, rng)
    if kind == "kinds":  # the kind list alone: the kind word must find its shape to name the colour
        return [place_list(objs, rng, *PLACE_LISTS[2])]
    short = {"short": True, "full": False, "conversation": rng.random() < 0.5}[kind]
    return conversation(objs, rng, short)


def scene_in_words(record, rng):
    """The scene told in words, for text-only records: what the image shows, as a sentence."""
    objs, background = read_record(record)
    listing = join_words([f"a {o.size} {o.name} {o.where}" for o in objs])
    return rng.choice(INTROS).format(f"{listing}, on a {background} background")


def make_record(kind, record, rid, rng, text_only=False):
    """One LLaVA JSON record; an image record puts <image> before or after the first question."""
    pairs = respond(kind, record, rng)
    conversations = []
    for k, (question, answer) in enumerate(pairs):
        if k == 0 and text_only:
            question = f"{scene_in_words(record, rng)} {question}"
        elif k == 0:  # the paper randomly puts the image first or last
            question = f"{IMAGE_PLACEHOLDER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_PLACEHOLDER}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": rid, **({} if text_only else {"image": record["image"]}), "conversations": conversations}


def record_rng(seed, rid):  # seeded by the record's id (str seeds hash with SHA-512): reproducible alone
    return random.Random(f"{seed}/{rid}")


def pretrain_records(records, seed):
    """Stage 1 (like blip_laion_cc_sbu_558k.json): one brief prompt + one caption per image."""
    return [make_record("brief", r, r["id"], record_rng(seed, r["id"])) for r in records]


def text_only_records(records, seed, per_scene=5):
    """Records with the scene told in words instead of an image (no `image`, no <image>): `per_scene`
    per scene, cycling through short and full-sentence conversations, a detailed description, a complex
    question and a caption, so that an LM trained on them alone learns the world's language and chat."""
    kinds = ["short", "full", "detail", "complex", "brief"]
    order = {r["id"]: random.Random(f"{seed}/lm/{r['id']}").sample(kinds, len(kinds)) for r in records}
    rid = lambda r, j: f"{r['id']}-lm-{j}"
    return [make_record(order[r["id"]][j % len(kinds)], r, rid(r, j), record_rng(seed, rid(r, j)), text_only=True)
            for r in records for j in range(per_scene)]


def instruct_records(records, seed, scale=PAPER_SCALE, text_only_fraction=TEXT_ONLY_FRACTION, places_fraction=PLACES_FRACTION):
    """Stage 2 (like llava_instruct_158k + a little of mix665k's region-level, short-answer and text-only data),
    shuffled: conversation, detailed and complex-reasoning records, 58:23:77 x `scale` per 80 images, each on a random
    image; `places_fraction` as many "places"; `text_only_fraction` text-only; per image of 2+ shapes QUIZ_PER_IMAGE
    quizzes, one "kinds" list, TWINS_PER_IMAGE "twins" and one "alone" record where they have a question to ask."""
    plan = {kind: round(len(records) * per_80 / PAPER_IMAGES * scale) for kind, per_80 in PAPER_MIX.items()}
    plan["places"] = round(sum(plan.values()) * places_fraction)
    plan["text"] = round(sum(plan.values()) * text_only_fraction / (1 - text_only_fraction))
    out = []
    for kind, n in plan.items():
        order = random.Random(f"{seed}/{kind}").sample(range(len(records)), len(records))
        for j in range(n if records else 0):
            r = records[order[j % len(records)]]  # each image once before any image twice
            rid = f"{r['id']}-{kind}-{j // len(records)}"
            rng = record_rng(seed, rid)
            if kind == "text":  # the scene told in words instead of shown
                out.append(make_record(rng.choice(list(PAPER_MIX)), r, rid, rng, text_only=True))
            else:
                out.append(make_record(kind, r, rid, rng))
    several = [r for r in records if len(r["instances"]) > 1]
    kinds = [f"quiz{k}" for k in range(QUIZ_PER_IMAGE)] + ["kinds"] + [f"twins{k}" for k in range(TWINS_PER_IMAGE)]
    for kind in kinds + ["alone"]:
        made = [make_record(kind.rstrip("0123456789"), r, f"{r['id']}-{kind}", record_rng(seed, f"{r['id']}-{kind}"))
                for r in several]
        out += [m for m in made if m["conversations"]]  # no twins in an image of four colours
    random.Random(f"{seed}/instruct").shuffle(out)
    return out


def places_records(records, seed, per_image=2, described=0.5):
    """The toy stage 2's first part (README), shuffled: the four places lists of each image `per_image` times, and
    descriptions of a `described` share of the images (with lists alone W let colour fade from H_v)."""
    out = [make_record("places", r, f"{r['id']}-lists-{k}", record_rng(seed, f"{r['id']}-lists-{k}"))
           for k in range(per_image) for r in records]
    out += [make_record("detail", r, f"{r['id']}-detail", record_rng(seed, f"{r['id']}-detail"))
            for r in records[:round(described * len(records))]]
    random.Random(f"{seed}/lists").shuffle(out)
    return out


# ---------------------------------------------------------------- benchmark

NUMBERS = {w: str(i) for i, w in enumerate(NUMBER_WORDS + ["eleven", "twelve"])}


def normalize_answer(text):
    """Normalize a short answer (gold or predicted) for exact-match scoring: lower case, punctuation to
    spaces, no articles a/an/the, number words zero..twelve as digits, whitespace collapsed.
    So "The Top-Left." and "top left" both give "top left", "Three" gives "3"."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


BENCH_QUESTIONS = {"count": q_count, "color": q_color, "shape": q_shape, "position": q_position, "relation": q_relation}


def bench_questions(records, seed):
    """Held-out questions as JSONL lines {question_id, image, text, answer, category}: one short-answer
    question per category per image (no relation for a lone shape), phrased exactly as in training;
    `answer` is the normalized gold answer."""
    out = []
    for r in records:
        objs, _ = read_record(r)
        rng = random.Random(f"{seed}/bench/{r['id']}")
        for category in BENCH_CATEGORIES:
            qa = BENCH_QUESTIONS[category](objs, rng)
            if qa is not None:
                out.append({"question_id": len(out), "image": r["image"], "text": qa[0] + SHORT_ANSWER,
                            "answer": normalize_answer(qa[1]), "category": category})
    return out

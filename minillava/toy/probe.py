"""python -m minillava.toy.probe: where does a toy LLaVA's knowledge stop? Three measurements.

    python -m minillava.toy.probe --model runs/finetune [--llm data/toy/llm] [--data data/toy]

  1. Reading, without the image: the bench's questions asked of a language model with the scene
     told in words instead ("Picture this: a small red circle in the top left, ... What color is
     the shape in the top left?"), greedy, scored per category as the toy bench scores. This is
     the in-context skill LLaVA borrows from its LLM: find the object the question names, copy
     its attribute. --llm picks the LM (default: the toy world's pretrained one).
  2. Seeing: linear probes (least squares on 2/3 of the training scenes' occupied cells, accuracy
     on the other 1/3) that read an object's colour and shape from its cell's token, before the
     projector (Z_v, CLIP's features) and after it (H_v = W(Z_v), what the LLM receives); and how
     much room each property takes in those tokens: the share of the occupied tokens' variance
     that their colour, their shape and their cell explain. A probe fits any direction, however
     faint; an LM trained for a few minutes reads the loud ones first.

  3. Writing: the places lists the model writes for the held-out images ("List every shape with its
     place ...", answered "red circle top left. ..."), the share of shapes placed right, by the
     number of shapes. The lookup in the framing stage 2 makes easiest; with one shape nothing
     needs binding. --questions also caps the images here. Then the same lists teacher-forced: given
     the true list so far and the next shape's name, is its place the model's first choice? (Writing
     also names the shapes, and its slips compound; this asks for the lookup alone. Naming the one
     place left needs no lookup: 75, 61, 52% for 2, 3, 4 shapes.)

If (2) is high and (1) and (3) are low, the image features carry the answer and the LM cannot use it yet.

  --stage1 DIR: instead, whether stage 1 aligned: the captions a stage-1 output (the frozen LM + W) writes
     for 50 held-out images of one shape, greedy; the share naming the colour and the kind right, and how many
     different captions there are; and the same LM's captions of the same scenes told in words, and with their
     words summed into one token where the image goes. In LLaVA the frozen LLM captions the image after stage 1.
  --copy-task N: instead, why the tiny LLaMA has 2 layers. Fresh models of the toy LM's shape with
     2 and with 4 layers, trained N steps (16 rows, the backbones' optimizer and schedule) on rows of
     32 random tokens followed by the same 32 again; printed: the loss on the repeat every 50 steps
     (ln 997 = 6.9 is guessing; near 0 is copying, the skill LLaVA asks of its LM).
  --lookup-task N: why the LM does not pick the shape a question names. Fresh toy-shaped LMs trained
     (32 rows, peak learning rate 5e-4 unless --lr) on the bench's position question reduced to its bones, with
     perfect visual tokens: 9 tokens, one per cell, each naming its object's colour, shape and cell (or an
     empty cell), then a colour token and a shape token; the target is the named object's cell. Framings,
     N steps each unless said: bare; 1 filler token between the name and the answer; 14 there, where the
     vicuna_v1 prompt puts "? Answer the question using a single word or phrase. ASSISTANT:"; also its 33
     before the image (BOS, the system prompt, "USER:"), as the bench asks; that framing for N/2 steps after
     N bare; and the gap widened step by step (0.6 N steps bare, then 0.15 N each at 1, 2, 4 and 8 tokens
     after the name with 0, 4, 12, 24 before, then 0.3 N in the bench's framing); and the bench's framing for
     N/2 steps after N steps of places lists (33 before the image, 15 question tokens after it, then every
     object in a random order as its colour, its shape, its cell, "."), without and with a ":" after the name.
     Printed: the accuracy in the last framing trained, on fresh rows with 2, 3 and 4 objects (chance 1/2,
     1/3, 1/4), and what reading the shape word alone gives (a guess among the objects of the named kind).
     --framing PREFIX (repeatable) runs only the framings whose printed name starts with PREFIX; --seed
     sets the LMs' init and rows (default 0).
"""
import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import build_llava
from ..constants import IMAGE_TOKEN_INDEX
from ..conversation import prompt_ids, tokenize_conversation
from ..eval.common import generate_answers
from ..image import open_image, preprocess
from ..llava import LLaVA
from ..tokenizer import Tokenizer
from ..llama import LlamaConfig
from ..training import cli, cpu_dtype
from .backbones import GRID, load_split, split_cells, train_loop
from .lm import CONV_MODE, LM_CONFIG, greedy_answer, greedy_ids, new_llama
from .teacher import PLACES_BY_NAME, normalize_answer, read_record, scene_in_words
from .world import COLORS, POSITIONS, SHAPES


def reading(llm, data, limit):
    """Per-category accuracy of `llm` on the bench questions, the scene given in words."""
    tok, lm = Tokenizer(llm), build_llava(Path(data) / "clip", llm).language_model.eval()
    scenes = {r["image"]: r for r in map(json.loads, (Path(data) / "caps_boxes_test.jsonl").open())}
    questions = [json.loads(line) for line in (Path(data) / "bench.jsonl").open()][:limit]
    right = defaultdict(list)
    with torch.no_grad():
        for q in questions:
            scene = scene_in_words(scenes[q["image"]], random.Random(q["question_id"]))
            answer = greedy_answer(lm, tok, f"{scene} {q['text']}", max_new_tokens=8)
            right[q["category"]].append(normalize_answer(answer) == normalize_answer(q["answer"]))
    return {c: round(100 * sum(v) / len(v), 1) for c, v in right.items()}


def writing(model_dir, data, limit):
    """{n shapes: percent of shapes placed right} in the lists the model writes for held-out images,
    greedy: a shape counts when the list holds "<its name> <its place>". The lookup in its easiest
    framing, as stage 2 trained it; a lone shape needs no binding, two to four do."""
    model, tok = LLaVA.from_pretrained(model_dir).eval(), Tokenizer(model_dir)
    conv_mode = model.config.conv_mode
    records = [json.loads(line) for line in (Path(data) / "caps_boxes_test.jsonl").open()][:limit]
    right = defaultdict(list)
    for i in range(0, len(records), 32):
        batch = records[i:i + 32]
        items = [{"prompt": f"<image>\n{PLACES_BY_NAME}", "image": Path(data) / "images" / r["image"]} for r in batch]
        for r, text in zip(batch, generate_answers(model, tok, conv_mode, items, max_new_tokens=64)):
            objs = read_record(r)[0]
            right[len(objs)] += placed_right(text, objs)
    return {n: round(100 * sum(v) / len(v), 1) for n, v in sorted(right.items())}


def placing(model_dir, data, limit):
    """{n shapes: percent of shapes placed right} in the same lists, teacher-forced: given the true list so far
    and the next shape's name, is every word of its place the model's first choice? Writing a list also asks the
    model to name the shapes, and its slips compound; this asks for the lookup alone. Naming the one place left
    needs no lookup: that alone gives 75, 61 and 52% for 2, 3 and 4 shapes."""
    model, tok = LLaVA.from_pretrained(model_dir).eval(), Tokenizer(model_dir)
    place_words, shape_words = {"▁" + w for p in POSITIONS for w in p.split()}, {"▁" + s for s in SHAPES}
    right = defaultdict(list)
    for r in [json.loads(line) for line in (Path(data) / "caps_boxes_test.jsonl").open()][:limit]:
        objs = read_record(r)[0]
        answer = ". ".join(f"{o.name} {o.position}" for o in random.Random(r["id"]).sample(objs, len(objs))) + "."
        ids, labels = tokenize_conversation(tok, model.config.conv_mode, [f"<image>\n{PLACES_BY_NAME}", answer])
        image = preprocess(open_image(Path(data) / "images" / r["image"]), model.config.vision.image_size, pad=True)
        with torch.no_grad():
            x, labels, _ = model.splice(torch.tensor([ids]), image[None], torch.tensor([labels]))
            guess = model.language_model.lm_head(model.language_model.model(x))[0].argmax(-1)     # (L,)
        labels = labels[0].tolist()
        pieces = [tok.sp.id_to_piece(t) if t >= 0 else "" for t in labels]
        for t in range(1, len(pieces)):
            if pieces[t] in place_words and pieces[t - 1] in shape_words:           # "circle", "top"
                end = next(u for u in range(t, len(pieces)) if pieces[u] not in place_words)
                right[len(objs)].append(all(guess[u - 1] == labels[u] for u in range(t, end)))
    return {n: round(100 * sum(v) / len(v), 1) for n, v in sorted(right.items())}


def captioning(stage1_dir, data, limit=50):
    """Does stage 1 align? The frozen LM + W (a stage-1 output) captions held-out images of one shape, greedy, in the
    template stage 1 trained with: the share that name the shape's colour first and its kind first, and how many
    different captions there are (one for every image: the captions do not depend on the image). The control: the same
    frozen LM asked for the caption with the same scenes told in words instead, in its own chat template; and with
    each scene's words ("a small red circle in the center") summed into one token where the image goes, the most a
    W could hand the LM in one token per cell if the LM read tokens as it reads words."""
    cfg = json.loads((Path(stage1_dir) / "projector_config.json").read_text())
    model = build_llava(cfg["vision"], cfg["llm"], cfg["projector_type"], stage1_dir).eval()
    tok, conv_mode = Tokenizer(cfg["llm"]), cfg.get("conv_mode", "plain")
    lm, E = model.language_model, model.language_model.model.embed_tokens.weight
    brief = "Provide a brief description of the given image."
    prompt = "<image>" if conv_mode == "plain" else f"<image>\n{brief}"
    records = [r for r in map(json.loads, (Path(data) / "caps_boxes_test.jsonl").open())
               if len(r["instances"]) == 1][:limit]
    items = [{"prompt": prompt, "image": Path(data) / "images" / r["image"]} for r in records]
    captions = generate_answers(model, tok, conv_mode, items, max_new_tokens=24)
    in_words = [greedy_answer(lm, tok, f"{scene_in_words(r, random.Random(r['id']))} {brief}", 24) for r in records]
    ids = prompt_ids(tok, CONV_MODE, f"<image>\n{brief}")
    at = ids.index(IMAGE_TOKEN_INDEX)
    one_token = []
    for r in records:
        o = read_record(r)[0][0]
        token = E[tok.encode(f"a {o.size} {o.name} {o.where}")].sum(0, keepdim=True)       # (1, D)
        x = torch.cat([E[ids[:at]], token, E[ids[at + 1:]]])[None]                           # (1, T, D)
        one_token.append(tok.decode(greedy_ids(lm, x, tok.eos_id, 24)))
    out = {"images": len(records)}
    for name, texts in (("from_W", captions), ("scene_in_words", in_words), ("words_summed_in_one_token", one_token)):
        named = [names_first(text, read_record(r)[0][0]) for r, text in zip(records, texts)]
        out[name] = {"colour_named_right": round(100 * sum(c for c, _ in named) / len(named), 1),
                     "kind_named_right": round(100 * sum(k for _, k in named) / len(named), 1),
                     "different_captions": len(set(texts)), "examples": texts[:3]}
    return out


def names_first(text, obj):
    """(colour right, kind right): whether the first colour word and the first kind word in text are obj's."""
    words = normalize_answer(text).split()
    first = lambda vocabulary: next((w for w in words if w in vocabulary), None)
    return first(COLORS) == obj.color, first(SHAPES) == obj.shape


def placed_right(text, objs):
    """For each of the scene's objects (teacher.read_record), whether the list holds "<name> <place>"."""
    written = {item.strip() for item in text.split(".")}
    return [f"{o.name} {o.position}" in written for o in objs]


def linear_probe(features, targets, classes):
    """Least squares from features (N, D) to one-hot targets; accuracy on the last third."""
    A = torch.cat([features, torch.ones(len(features), 1)], 1).double()      # (N, D + 1)
    Y = torch.nn.functional.one_hot(targets, classes).double()              # (N, classes)
    n = 2 * len(A) // 3
    fit = torch.linalg.solve(A[:n].T @ A[:n] + 1e-3 * torch.eye(A.shape[1], dtype=A.dtype), A[:n].T @ Y[:n])
    return round(100 * ((A[n:] @ fit).argmax(1) == targets[n:]).double().mean().item(), 1)


def explained(features, labels):
    """Share of the variance of features (N, D) explained by the class means of labels (N,), in %."""
    centred = features - features.mean(0)
    between = sum((labels == c).sum() * centred[labels == c].mean(0).square().sum() for c in labels.unique())
    return round(100 * (between / centred.square().sum()).item(), 1)


def seeing(model_dir, data, n_images):
    model = LLaVA.from_pretrained(model_dir).eval()
    X_v, _, cells = load_split(data, "train")                               # as the tiny CLIP was trained
    X_v, cells = X_v[:n_images], cells[:n_images].flatten()                 # cells: 0 empty, else 1 + colour x shape
    with torch.no_grad():
        Z_v = model.vision_tower(X_v)                                       # (N, N_v, D_v)
        H_v = model.multi_modal_projector(Z_v)                              # (N, N_v, D)
    if Z_v.shape[1] != GRID * GRID:
        raise SystemExit(f"{model_dir}: {Z_v.shape[1]} visual tokens, the probe needs one per cell ({GRID * GRID})")
    occupied = cells > 0
    color, shape = (labels[occupied] - 1 for labels in split_cells(cells))
    cell = torch.arange(GRID * GRID).repeat(len(X_v))[occupied]
    out = {}
    for name, tokens in (("Z_v", Z_v), ("H_v", H_v)):
        X = tokens.flatten(0, 1)[occupied].float()                           # (N_occupied, D)
        out[name] = {"probe_color": linear_probe(X, color, len(COLORS)), "probe_shape": linear_probe(X, shape, len(SHAPES)),
                     "variance_color": explained(X, color), "variance_shape": explained(X, shape),
                     "variance_cell": explained(X, cell)}
    return out


def copy_task(layers, steps, n=32, batch_size=16, vocab=1000, seed=0):
    """Loss on the repeated half of [BOS, x, x] rows (x: n random tokens), every 50 steps."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, **{**LM_CONFIG, "num_hidden_layers": layers})
    lm = new_llama(cfg)                                     # the init train_lm uses
    g, repeat = torch.Generator().manual_seed(seed), []

    def loss_fn():
        x = torch.randint(3, vocab, (batch_size, n), generator=g)
        ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), x, x], 1)         # (B, 1 + 2n)
        losses = F.cross_entropy(lm(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="none").view(batch_size, -1)                 # (B, 2n)
        repeat.append(losses[:, n:].mean().item())
        return losses.mean()
    dtype = cpu_dtype()
    train_loop(list(lm.parameters()), loss_fn, steps, 2e-3, (0.9, 0.95), dtype, f"copy task, {layers} layers", False)
    return [round(sum(repeat[i - 50:i]) / 50, 2) for i in range(50, steps + 1, 50)]


# The lookup task's vocabulary: BOS, fillers before the image and after the name, 9 cells x (20 objects or
# empty), colour words, shape words, the 9 answers.
BEFORE, AFTER = 40, 24                                      # room for the filler tokens on each side
N_OBJECTS = len(COLORS) * len(SHAPES)                       # 20 colour x shape pairs; N_OBJECTS = an empty cell
CELL_TOKENS = 1 + BEFORE + AFTER
COLOR_WORDS = CELL_TOKENS + GRID * GRID * (N_OBJECTS + 1)
SHAPE_WORDS = COLOR_WORDS + len(COLORS)
ANSWERS = SHAPE_WORDS + len(SHAPES)
DOT, COLON = BEFORE - 1, BEFORE          # the places lists' punctuation: two filler ids no framing reaches


def lookup_scene(g):
    """2-4 distinct objects in distinct cells: (cells, objects, the 9 cell tokens)."""
    n = int(torch.randint(2, 5, (1,), generator=g))
    cells = torch.randperm(GRID * GRID, generator=g)[:n].tolist()
    objects = torch.randperm(N_OBJECTS, generator=g)[:n].tolist()            # no two objects alike
    image = [CELL_TOKENS + c * (N_OBJECTS + 1) + N_OBJECTS for c in range(GRID * GRID)]
    for c, o in zip(cells, objects):
        image[c] = CELL_TOKENS + c * (N_OBJECTS + 1) + o
    return cells, objects, image


def name_of(o):
    return [COLOR_WORDS + o // len(SHAPES), SHAPE_WORDS + o % len(SHAPES)]


def lookup_rows(batch_size, before, after, g):
    """(B, T) ids, (B,) target cells and (B,) object counts for the lookup task:
    [BOS, `before` fillers, 9 cell tokens, colour word, shape word, `after` fillers] -> the named object's cell."""
    assert before < DOT and after <= AFTER
    rows, targets, counts = [], [], []
    for _ in range(batch_size):
        cells, objects, image = lookup_scene(g)
        k = int(torch.randint(0, len(cells), (1,), generator=g))             # the object the question names
        fillers_after = list(range(1 + BEFORE, 1 + BEFORE + after))
        rows.append([0] + list(range(1, 1 + before)) + image + name_of(objects[k]) + fillers_after)
        targets.append(ANSWERS + cells[k])
        counts.append(len(cells))
    return torch.tensor(rows), torch.tensor(targets), torch.tensor(counts)


def list_rows(batch_size, before, after, g, colon):
    """(B, T) ids and labels for a places list: [BOS, `before` fillers, 9 cell tokens, `after` fillers (the
    question), then every object in a random order as colour, shape, (":"), its cell, "."]; labels are the
    cells (-100 elsewhere). Rows end with "." up to the longest."""
    assert before < DOT and after <= AFTER
    rows, labels = [], []
    for _ in range(batch_size):
        cells, objects, image = lookup_scene(g)
        row = [0] + list(range(1, 1 + before)) + image + list(range(1 + BEFORE, 1 + BEFORE + after))
        label = [-100] * len(row)
        for k in torch.randperm(len(cells), generator=g).tolist():
            row += name_of(objects[k]) + [COLON] * colon + [ANSWERS + cells[k], DOT]
            label += [-100] * (2 + colon) + [ANSWERS + cells[k], -100]
        rows.append(row)
        labels.append(label)
    T = max(map(len, rows))
    return (torch.tensor([r + [DOT] * (T - len(r)) for r in rows]),
            torch.tensor([lab + [-100] * (T - len(lab)) for lab in labels]))


def lookup_task(phases, batch_size=32, seed=0, test_rows=600, lr=5e-4):
    """Accuracy (%) with 2, 3, 4 objects of a fresh LM of the toy shape trained on lookup_rows in each of
    `phases`, [(before, after, steps)] in turn, scored in the framing of the last phase. A phase
    (before, after, steps, "list") or (..., "list:") trains on places lists instead (list_rows; ":" after each name)."""
    torch.manual_seed(seed)
    lm = new_llama(LlamaConfig(vocab_size=ANSWERS + GRID * GRID, **LM_CONFIG))
    g = torch.Generator().manual_seed(seed)
    for before, after, steps, *form in phases:
        def loss_fn():
            if form:
                ids, labels = list_rows(batch_size, before, after, g, colon=form[0] == "list:")
                logits = lm(ids)[:, :-1].flatten(0, 1).float()                 # position t predicts t + 1
                return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
            ids, targets, _ = lookup_rows(batch_size, before, after, g)
            return F.cross_entropy(lm(ids)[:, -1].float(), targets)            # the answer after the last token
        train_loop(list(lm.parameters()), loss_fn, steps, lr, (0.9, 0.95), cpu_dtype(), f"lookup {before}/{after}", False)
    ids, targets, n_objects = lookup_rows(test_rows, before, after, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        right = lm.eval()(ids)[:, -1].argmax(-1) == targets
    # What reading the shape word alone gives: a guess among the objects of the named kind.
    objects = (ids[:, 1 + before:10 + before] - CELL_TOKENS) % (N_OBJECTS + 1)             # (B, 9)
    same_kind = (objects != N_OBJECTS) & (objects % len(SHAPES) == (ids[:, 11 + before] - SHAPE_WORDS)[:, None])
    by_kind = 1 / same_kind.sum(1).float()
    return {**{f"{n}_objects": round(100 * right[n_objects == n].float().mean().item(), 1) for n in (2, 3, 4)},
            "shape_word_alone": [round(100 * by_kind[n_objects == n].mean().item(), 1) for n in (2, 3, 4)]}


def lookup_framings(n):
    """--lookup-task's runs: name -> phases (see the module docstring)."""
    chat = (33, 14)                                      # vicuna_v1's tokens before the image, after the name
    widen = [(0, 0, 6 * n // 10)] + [(b, a, 15 * n // 100) for b, a in ((0, 1), (4, 2), (12, 4), (24, 8))]
    return {"bare": [(0, 0, n)], "1 token after the name": [(0, 1, n)], "14 tokens after the name": [(0, 14, n)],
            "and 33 before the image": [(*chat, n)], f"the same, {n // 2} steps after {n} bare": [(0, 0, n), (*chat, n // 2)],
            "the gap widened step by step": widen + [(*chat, 3 * n // 10)],
            f"the same, {n // 2} steps after {n} of places lists": [(33, 15, n, "list"), (*chat, n // 2)],
            f"the same, {n // 2} steps after {n} of places lists with a colon": [(33, 15, n, "list:"), (*chat, n // 2)]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minillava.toy.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/finetune", help="a trained toy LLaVA (default: %(default)s)")
    p.add_argument("--llm", default=None, help="LM for the reading test (default: <data>/llm)")
    p.add_argument("--data", default="data/toy", help="the toy world (default: %(default)s)")
    p.add_argument("--questions", type=int, default=400, help="bench questions for the reading test")
    p.add_argument("--images", type=int, default=1500, help="training scenes for the probes")
    p.add_argument("--stage1", metavar="DIR", help="instead: the captions a stage-1 output (frozen LM + W) writes for lone shapes")
    p.add_argument("--copy-task", type=int, metavar="N", help="train fresh 2- and 4-layer LMs N steps on copying instead")
    p.add_argument("--lookup-task", type=int, metavar="N", help="train fresh LMs about N steps each on a bare lookup in 8 framings instead")
    p.add_argument("--framing", action="append",
                   help="with --lookup-task: only the framings whose name starts with this (repeatable)")
    p.add_argument("--lr", type=float, default=5e-4, help="with --lookup-task: peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="with --lookup-task: the LMs' init and rows (default: %(default)s)")
    args = p.parse_args(argv)
    if args.lookup_task:
        runs = {name: phases for name, phases in lookup_framings(args.lookup_task).items()
                if not args.framing or name.startswith(tuple(args.framing))}
        if not runs:
            names = list(lookup_framings(args.lookup_task))
            raise SystemExit(f"error: no framing starts with {args.framing}; the framings: {names}")
        print(json.dumps({name: lookup_task(phases, seed=args.seed, lr=args.lr) for name, phases in runs.items()}, indent=1))
        return
    if args.stage1:
        print(json.dumps(captioning(args.stage1, args.data), indent=1))
        return
    if args.copy_task:
        print(json.dumps({f"{layers}_layers_repeat_loss_per_50_steps": copy_task(layers, args.copy_task)
                          for layers in (2, 4)}, indent=1))
        return
    llm = args.llm or str(Path(args.data) / "llm")
    result = {"reading_in_words": {"llm": llm, **reading(llm, args.data, args.questions)},
              "places_lists_shapes_placed_right_by_shapes": writing(args.model, args.data, args.questions),
              "places_lists_given_the_names_by_shapes": placing(args.model, args.data, args.questions),
              "probes_percent": seeing(args.model, args.data, args.images)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    cli(main)

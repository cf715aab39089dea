"""The toy backbones: real folder layouts that the real loaders read, a learning LM, skipped re-runs,
same seed -> same weights."""
import json
import random
import re
import time

import pytest
import torch
from safetensors import safe_open

from minillava import LLaVA
from minillava.checkpoint import build_llava
from minillava.constants import IMAGE_TOKEN_INDEX
from minillava.conversation import prompt_ids
from minillava.eval.common import EvalError
from minillava.saving import save_projector
from minillava.tokenizer import Tokenizer
from minillava.toy import attention, backbones, lm, probe, teacher
from minillava.toy.__main__ import main

ARGS = ["--n-train", "64", "--n-test", "16", "--clip-steps", "6", "--lm-steps", "20", "--no-progress"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    main(["--out", str(out)] + ARGS)
    return out


def keys(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return list(f.keys())


def test_clip_folder_is_an_openai_clip_vision_half(toy):
    config = json.loads((toy / "clip" / "config.json").read_text())
    assert config["model_type"] == "clip"
    vision = config["vision_config"]                              # nested, as in openai/clip-vit-*
    assert (vision["image_size"], vision["patch_size"], vision["hidden_act"]) == (72, 24, "quick_gelu")
    names = keys(toy / "clip")
    assert all(k.startswith("vision_model.") for k in names)     # the text tower was thrown away
    assert "vision_model.post_layernorm.weight" in names         # kept: the folder round-trips


def test_llm_folder_has_a_llama_tokenizer_matching_the_embeddings(toy):
    config = json.loads((toy / "llm" / "config.json").read_text())
    tok = Tokenizer(toy / "llm")                                   # reads llm/tokenizer.model
    with safe_open(toy / "llm" / "model.safetensors", framework="pt") as f:
        V, D = f.get_slice("model.embed_tokens.weight").get_shape()
    assert tok.vocab_size == config["vocab_size"] == V and D == config["hidden_size"]
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)   # LLaMA's ids
    assert tok.sp.encode("12\n", out_type=str) == ["▁", "1", "2", "<0x0A>"]   # digits split, byte fallback
    # The world's words are pieces of their own, and no other piece holds one: a name is always two tokens.
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert all("▁" + w in pieces for w in lm.KEPT_WORDS)
    assert not [p for p in pieces if p[1:] not in lm.KEPT_WORDS and set(p.split("▁")[1:]) & set(lm.KEPT_WORDS)]
    assert tok.sp.encode("Where is the red square?", out_type=str)[-3:] == ["▁red", "▁square", "?"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]      # GQA


def test_tokenizer_reads_only_the_lm_text_so_stage_2_data_does_not_redraw_it(toy, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    (world / "lm_corpus.json").write_text((toy / "lm_corpus.json").read_text())
    (world / "instruct.json").write_text('[{"id": "x", "conversations": [{"from": "human", "value": "zebra"}]}]')
    lm.train_tokenizer(world, tmp_path / "a.model")
    (world / "instruct.json").write_text((toy / "instruct.json").read_text())
    lm.train_tokenizer(world, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_backbones_load_through_build_llava_and_from_parts(toy):
    model = build_llava(toy / "clip", toy / "llm")
    again = LLaVA.from_parts(str(toy / "clip"), str(toy / "llm"), projector_type="linear")
    assert again.config.num_image_tokens == model.config.num_image_tokens == 9    # 72 px / 24 px patches: the 3 x 3 grid
    tok = Tokenizer(toy / "llm")
    ids = torch.tensor(prompt_ids(tok, "vicuna_v1", "<image>\nWhat color is the shape in the center?"))
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    with torch.no_grad():
        logits = model([ids], torch.zeros(1, 3, 72, 72))
    assert logits.shape == (1, len(ids) - 1 + 9, tok.vocab_size)
    # The longest chat plus the image fits the positions the LM was configured for.
    report = json.loads((toy / "backbones.json").read_text())
    assert report["llm"]["longest_chat_tokens"] + 9 <= model.config.text.max_position_embeddings


def test_lm_training_loss_goes_down(toy):
    report = json.loads((toy / "backbones.json").read_text())
    first_10, last_10 = report["llm"]["loss_per_10_steps"]      # mean loss of steps 0-9 and 10-19
    assert last_10 < first_10 - 0.5
    assert report["clip"]["retrieval_images"] == 16 and 0 <= report["clip"]["retrieval_top1"] <= 1
    assert len(report["llm"]["samples"]) > 0
    assert 0 <= report["clip"]["heldout_objects_named_from_their_cell"] <= 1


def test_rerun_skips_complete_parts_and_a_changed_setting_rebuilds_only_that_part(toy, capsys):
    mtimes = {p: p.stat().st_mtime_ns for p in toy.rglob("*.safetensors")}
    start = time.perf_counter()
    main(["--out", str(toy)] + ARGS)
    printed = capsys.readouterr().out
    assert time.perf_counter() - start < 5
    assert printed.count("skipped") == 3, printed                 # world, clip, llm
    assert {p: p.stat().st_mtime_ns for p in toy.rglob("*.safetensors")} == mtimes

    main(["--out", str(toy)] + ARGS + ["--clip-steps", "3"])      # the last --clip-steps wins
    printed = capsys.readouterr().out
    assert "clip   skipped" not in printed and "llm    skipped" in printed
    assert json.loads((toy / "backbones.json").read_text())["clip"]["steps"] == 3


def test_same_seed_gives_the_same_weights(toy, tmp_path):
    for name, train, steps in (("clip", backbones.train_clip, 2), ("llm", lm.train_lm, 2)):
        a, b = tmp_path / f"{name}_a", tmp_path / f"{name}_b"
        train(str(toy), a, steps=steps, seed=3, progress=False)
        train(str(toy), b, steps=steps, seed=3, progress=False)
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(), name
    assert (tmp_path / "llm_a" / "tokenizer.model").read_bytes() == (tmp_path / "llm_b" / "tokenizer.model").read_bytes()


def test_linear_probe_reads_a_planted_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    signal = torch.nn.functional.one_hot(labels, 4).float() * 3 + torch.randn(600, 4, generator=g) * 0.1
    noise = torch.randn(600, 16, generator=g)
    assert probe.linear_probe(torch.cat([noise, signal], 1), labels, 4) == 100.0
    assert probe.linear_probe(noise, labels, 4) < 45                         # chance is 25%


def test_explained_variance_is_the_share_of_the_class_means():
    labels = torch.tensor([0, 0, 1, 1])
    # features = class part (+-1 on dim 0) + noise (+-1 on dim 1, orthogonal): half of the variance each
    features = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    assert probe.explained(features, labels) == 50.0
    assert probe.explained(features[:, :1], labels) == 100.0
    assert probe.explained(features[:, 1:], labels) == 0.0


def test_names_first_scores_the_first_colour_and_kind_a_caption_names():
    obj = teacher.read_record({"instances": [{"category": "red circle", "bbox": [0.0, 0.0, 0.3, 0.3]}],
                               "captions": ["A red circle on a plain light gray background."]})[0][0]
    assert probe.names_first("A simple picture of a small Red circle.", obj) == (True, True)
    assert probe.names_first("A blue circle and a red square.", obj) == (False, True)     # the first ones count
    assert probe.names_first("A red square and a blue circle.", obj) == (True, False)
    assert probe.names_first("Nothing here.", obj) == (False, False)


def test_stage1_captions_are_scored_on_the_lone_shapes(toy, tmp_path):
    model = build_llava(toy / "clip", toy / "llm")                               # a fresh W: stage 1 not yet run
    save_projector(model, tmp_path / "s1", {"vision": str(toy / "clip"), "llm": str(toy / "llm"), "conv_mode": "plain"})
    lone = sum(len(json.loads(line)["instances"]) == 1 for line in (toy / "caps_boxes_test.jsonl").open())
    result = probe.captioning(tmp_path / "s1", toy)
    assert result["images"] == lone > 0
    for source in ("from_W", "scene_in_words", "words_summed_in_one_token"):
        assert 1 <= result[source]["different_captions"] <= lone
        assert 0 <= result[source]["colour_named_right"] <= 100 and 0 <= result[source]["kind_named_right"] <= 100


def test_copy_task_reports_the_loss_on_the_repeat():
    curve = probe.copy_task(layers=1, steps=50, n=8, batch_size=4)
    assert len(curve) == 1 and 0 < curve[0] < 8                        # guessing is ln 997 = 6.9


def test_lookup_rows_name_an_object_whose_cell_is_the_target():
    ids, targets, counts = probe.lookup_rows(64, 5, 3, torch.Generator().manual_seed(0))
    assert ids.shape == (64, 1 + 5 + 9 + 2 + 3) and ids[:, 0].eq(0).all()
    image = ids[:, 6:15] - probe.CELL_TOKENS                                     # cell x 21 + object
    color, shape = ids[:, 15] - probe.COLOR_WORDS, ids[:, 16] - probe.SHAPE_WORDS
    assert ((image % 21 != probe.N_OBJECTS).sum(1) == counts).all() and set(counts.tolist()) <= {2, 3, 4}
    assert (image // 21 == torch.arange(9)).all()                                # each token sits in its cell
    named = image[torch.arange(64), targets - probe.ANSWERS] % 21                # the object at the answer's cell
    assert (named // 4 == color).all() and (named % 4 == shape).all()
    assert ids[:, 1:6].max() < ids[:, 17:].min() < probe.CELL_TOKENS             # fillers differ on each side


def test_list_rows_pair_every_object_with_its_cell():
    for colon in (False, True):
        ids, labels = probe.list_rows(32, 4, 6, torch.Generator().manual_seed(1), colon)
        start = 1 + 4 + 9 + 6                                                    # the list starts here
        for row, lab in zip(ids.tolist(), labels.tolist()):
            cells = {c for c, tok in enumerate(row[5:14]) if (tok - probe.CELL_TOKENS) % 21 != probe.N_OBJECTS}
            listed = [t - probe.ANSWERS for t in lab if t != -100]
            assert sorted(listed) == sorted(cells) and 2 <= len(listed) <= 4         # every object once
            for i, t in enumerate(lab):
                if t != -100:                                                     # name (":") cell "."
                    assert row[i] == t and row[i + 1] == probe.DOT
                    obj = (row[5 + t - probe.ANSWERS] - probe.CELL_TOKENS) % 21
                    name = row[i - 2 - colon:i - colon]
                    assert name == [probe.COLOR_WORDS + obj // 4, probe.SHAPE_WORDS + obj % 4]
                    assert (row[i - 1] == probe.COLON) == colon
            assert next(i for i, t in enumerate(lab) if t != -100) == start + 2 + colon  # right after the question


def test_lookup_task_reports_accuracy_per_object_count():
    acc = probe.lookup_task([(0, 0, 3), (2, 3, 3, "list:"), (2, 2, 3)], batch_size=4, test_rows=60)
    alone = acc.pop("shape_word_alone")                        # 1 / the objects of the named kind
    assert set(acc) == {"2_objects", "3_objects", "4_objects"} and all(0 <= v <= 100 for v in acc.values())
    assert all(100 / n <= a <= 100 for n, a in zip((2, 3, 4), alone)) and alone[0] > alone[2]
    runs = probe.lookup_framings(1000)
    assert all(phases[-1][:2] == (33, 14) for name, phases in runs.items() if "gap" in name or "same" in name)
    widen = runs["the gap widened step by step"]
    assert [a for _, a, _ in widen] == sorted(a for _, a, _ in widen) and sum(n for *_, n in widen) == 1500


def test_lookup_task_command_runs_only_the_framings_asked(capsys):
    probe.main(["--lookup-task", "2", "--framing", "bare", "--framing", "and 33"])
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["bare", "and 33 before the image"]
    assert set(report["bare"]) == {"2_objects", "3_objects", "4_objects", "shape_word_alone"}
    with pytest.raises(SystemExit, match="no framing starts with"):
        probe.main(["--lookup-task", "2", "--framing", "nonsense"])


def test_lookup_task_command_passes_learning_rate_and_seed(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(probe, "lookup_task", lambda phases, **kw: seen.append(kw) or {"2_objects": 0.0})
    probe.main(["--lookup-task", "2", "--framing", "bare", "--lr", "1.25e-4", "--seed", "3"])
    assert seen == [{"seed": 3, "lr": 1.25e-4}]
    probe.main(["--lookup-task", "2", "--framing", "bare"])                  # defaults: stage 2's rate, seed 0
    assert seen[1] == {"seed": 0, "lr": 5e-4}


def test_probe_command_reports_reading_and_probes(toy, tmp_path, capsys):
    build_llava(toy / "clip", toy / "llm").save_pretrained(tmp_path / "llava", toy / "llm" / "tokenizer.model")
    probe.main(["--model", str(tmp_path / "llava"), "--data", str(toy), "--questions", "10", "--images", "64"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["probes_percent"]) == {"Z_v", "H_v"}
    assert all(0 <= v <= 100 for part in report["probes_percent"].values() for v in part.values())
    assert set(report["probes_percent"]["H_v"]) == {"probe_color", "probe_shape", "variance_color",
                                                    "variance_shape", "variance_cell"}
    assert "count" in report["reading_in_words"]
    placing = report["places_lists_given_the_names_by_shapes"]               # every test image has 1-4 shapes
    assert placing and set(placing) <= {"1", "2", "3", "4"} and all(0 <= v <= 100 for v in placing.values())


def test_places_list_scoring_counts_each_shape_named_with_its_own_place():
    record = {"captions": ["A red circle above a blue square on a plain light gray background."],
              "instances": [{"category": "red circle", "bbox": [0.05, 0.05, 0.25, 0.25]},
                            {"category": "blue square", "bbox": [0.4, 0.7, 0.6, 0.9]}]}
    objs, _ = teacher.read_record(record)
    assert [o.position for o in objs] == ["top left", "bottom"]
    assert probe.placed_right("red circle top left. blue square bottom.", objs) == [True, True]
    assert probe.placed_right("blue square top left. red circle top left.", objs) == [True, False]
    assert probe.placed_right("red circle top left", objs) == [True, False]          # the square is missing
    # The probe asks the teacher's own question, so the model is asked what stage 2 trained it on.
    questions = {q for q, _ in teacher.places(objs, random.Random(0))}
    assert probe.PLACES_BY_NAME is teacher.PLACES_BY_NAME and teacher.PLACES_BY_NAME in questions


def test_attention_weights_reproduce_what_the_layer_computes():
    from minillava.llama import LlamaAttention, LlamaConfig, rope_cos_sin
    cfg = LlamaConfig(vocab_size=10, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)   # GQA
    torch.manual_seed(0)
    attn = LlamaAttention(cfg, 0)
    x = torch.randn(2, 7, 32)
    cos, sin = rope_cos_sin(cfg, torch.arange(7).expand(2, 7), x.dtype)
    w = attention.attention_weights(attn, x, cos, sin)                          # (2, 4, 7, 7)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 7)) and (w.triu(1) == 0).all()
    v = attn.v_proj(x).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)   # (2, 4, 7, 8)
    y = attn.o_proj((w @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(y, attn(x, cos, sin, None, None), atol=1e-5)


def test_target_cell_is_the_place_named_or_answered():
    ask = teacher.SHORT_ANSWER
    assert attention.target_cell({"category": "position", "text": "Where is the red circle?" + ask,
                                  "answer": "top left"}) == 0
    assert attention.target_cell({"category": "color", "text": "What color is the shape in the top left?" + ask,
                                  "answer": "red"}) == 0
    assert attention.target_cell({"category": "shape", "text": "What shape is on the left?" + ask,
                                  "answer": "circle"}) == 3
    assert attention.target_cell({"category": "color", "text": "What color is the shape at the bottom?" + ask,
                                  "answer": "red"}) == 7
    with pytest.raises(EvalError, match="bench question 5: no place"):
        attention.target_cell({"question_id": 5, "category": "color", "text": "What color is it?", "answer": "red"})


def test_attention_command_reports_every_layer_and_head(toy, tmp_path, capsys):
    build_llava(toy / "clip", toy / "llm").save_pretrained(tmp_path / "llava", toy / "llm" / "tokenizer.model")
    attention.main(["--model", str(tmp_path / "llava"), "--data", str(toy), "--questions", "3"])
    out = capsys.readouterr().out
    layers = [line for line in out.splitlines() if line.strip().startswith("layer ")]
    categories = [line for line in out.splitlines() if "images with 2+ shapes" in line]
    assert categories and len(layers) == len(categories) * lm.LM_CONFIG["num_hidden_layers"]
    assert all(len(re.findall(r"\bh\d+ -\d+ ", line)) == lm.LM_CONFIG["num_attention_heads"] for line in layers)


def test_attention_command_names_a_missing_bench_file(tmp_path):
    with pytest.raises(SystemExit, match="bench.jsonl: no such file"):
        attention.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path)])

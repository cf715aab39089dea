"""Both training stages on a tiny world: what is frozen, how the loss is normalised, resuming."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image

import train_finetune
import train_pretrain
from minillava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLaVA
from minillava import training as T
from minillava.checkpoint import build_llava
from minillava.saving import save_clip, save_llama
from minillava.clip import CLIPVisionConfig, CLIPVisionTransformer
from minillava.data import DataError, LLaVADataset, load_records
from minillava.llama import LlamaConfig, LlamaForCausalLM
from minillava.plot import plot_loss
from minillava.tokenizer import Tokenizer
from minillava.toy import build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 48-image toy world with random tiny backbones in the real folder layouts."""
    d = tmp_path_factory.mktemp("world")
    build_world(d, n_train=48, n_test=4, seed=0, progress=False)
    text = [t["value"] for r in json.loads((d / "lm_corpus.json").read_text()) for t in r["conversations"]]
    (d / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=320, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    torch.manual_seed(0)
    save_clip(CLIPVisionTransformer(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=64, patch_size=16)), d / "clip")
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    save_llama(lm, d / "llm", d / "tok.model")
    return d


def flags(world, out, data="pretrain.json", **kw):
    args = {"vision": world / "clip", "llm": world / "llm", "data": world / data, "image-folder": world / "images",
            "out": out, "recipe": "toy", "dtype": "fp32", "workers": 0, "seed": 0, **kw}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_stage1_trains_only_W_and_stage2_never_touches_clip(world, tmp_path):
    fresh = build_llava(world / "clip", world / "llm")
    m1 = train_pretrain.main(flags(world, tmp_path / "s1", **{"max-steps": 3, "batch-size": 8, "micro-batch-size": 4}))
    for name, p in m1.named_parameters():
        same = torch.equal(p.detach().float(), fresh.state_dict()[name])
        assert same != name.startswith("multi_modal_projector."), name     # W changed, nothing else did
    assert Image.open(tmp_path / "s1" / "loss.png").size == (640, 360)
    state = torch.load(tmp_path / "s1" / "trainer_state.pt", weights_only=True)
    assert set(state["model"]) == {n for n, _ in m1.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    m2 = train_finetune.main(flags(world, tmp_path / "s2", "instruct.json", projector=tmp_path / "s1",
                                   **{"max-steps": 2, "batch-size": 8, "micro-batch-size": 4}))
    s1_W = LLaVA.from_pretrained(tmp_path / "s1").multi_modal_projector.state_dict()
    for name, p in m2.named_parameters():
        if name.startswith("vision_tower."):
            assert torch.equal(p.detach().float(), fresh.state_dict()[name]), name
    changed = lambda prefix, ref: any(not torch.equal(p.detach(), ref[n[len(prefix):]])
                                      for n, p in m2.named_parameters() if n.startswith(prefix))
    assert changed("multi_modal_projector.", s1_W)
    assert changed("language_model.", {k[len("language_model."):]: v for k, v in fresh.state_dict().items()})
    m2 = train_finetune.main(flags(world, tmp_path / "s2-0", "instruct.json", projector=tmp_path / "s1",
                                   **{"max-steps": 2, "batch-size": 8, "micro-batch-size": 4, "projector-lr": 0}))
    assert not changed("multi_modal_projector.", s1_W)                          # m2 now: --projector-lr 0 keeps W


def test_stage2_can_start_from_a_whole_llava(world, tmp_path):
    # --model: W and the LLM go on from an earlier stage 2 (as when fine-tuning llava-v1.5 on new data);
    # --llm and --projector are not needed. At lr 1e-12 one step leaves the weights where they started.
    common = {"max-steps": 1, "batch-size": 4, "micro-batch-size": 4}
    first = train_finetune.main(flags(world, tmp_path / "a", "instruct.json", projector="none", **common))
    args = flags(world, tmp_path / "b", "instruct.json", lr=1e-12, model=tmp_path / "a", **common)
    args = [a for i, a in enumerate(args) if a not in ("--vision", "--llm") and args[i - 1] not in ("--vision", "--llm")]
    second = train_finetune.main(args)
    fresh = build_llava(world / "clip", world / "llm").state_dict()
    before, after = first.state_dict(), second.state_dict()
    for name in ("language_model.model.layers.0.self_attn.q_proj.weight", "multi_modal_projector.linear_1.weight"):
        assert not torch.equal(before[name], fresh[name]) and torch.allclose(after[name], before[name], atol=1e-6), name
    assert LLaVA.from_pretrained(tmp_path / "b").config.conv_mode == "vicuna_v1"
    assert json.loads((tmp_path / "b" / "train_args.json").read_text())["projector"] is None
    with pytest.raises(SystemExit, match="--model brings its own W"):
        train_finetune.main(args + ["--projector", str(tmp_path / "a")])


def run(args, script="train_finetune.py", nproc=1, **popen):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else []) + [str(ROOT / script)] + args
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_toy_worlds_files_get_the_toy_recipe_and_backbones():
    resolve = lambda *argv: T.resolve(T.parser("finetune", "").parse_args(argv), "finetune", "instruct.json")
    default, places = resolve(), resolve("--data", "data/toy/places.json")     # the toy recipe's two parts
    assert default.data == "data/toy/instruct.json" and places.data == "data/toy/places.json"
    for args in (default, places):
        assert (args.lr, args.epochs, args.vision, args.llm) == (5e-4, 2, "data/toy/clip", "data/toy/llm")
    real = resolve("--data", "mix.json", "--vision", "clip", "--llm", "vicuna", "--image-folder", "images")
    assert (real.lr, real.batch_size) == (2e-5, 128)                            # elsewhere: LLaVA-1.5's
    with pytest.raises(SystemExit, match="--vision --llm --image-folder"):
        resolve("--data", "mix.json")


def test_same_global_batch_gives_same_losses_for_2_processes_and_for_accumulation(world, tmp_path):
    # Stage 2 with text-only records mixed in: W, the LLM, DDP's unused-parameter path all take part.
    # Length-grouped batches (LLaVA-1.5's stage 2) must be the same global batches too.
    common = {"max-steps": 3, "batch-size": 8, "projector": "none"}
    grouped = ["--group-by-length"]
    run(flags(world, tmp_path / "one", "instruct.json", **common, **{"micro-batch-size": 8}) + grouped)
    run(flags(world, tmp_path / "accum", "instruct.json", **common, **{"micro-batch-size": 2}) + grouped)
    run(flags(world, tmp_path / "ddp", "instruct.json", **common, **{"micro-batch-size": 4}) + grouped, nproc=2)
    one, accum, ddp = losses(tmp_path / "one"), losses(tmp_path / "accum"), losses(tmp_path / "ddp")
    assert len(one) == 3
    assert accum == pytest.approx(one, rel=1e-4)
    assert ddp == pytest.approx(one, rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "train_args.json").read_text())["accum"] == 1
    assert json.loads((tmp_path / "accum" / "train_args.json").read_text())["accum"] == 4


def test_length_grouped_order_pads_less_keeps_every_record_and_shuffles_the_batches():
    lengths = torch.randint(10, 200, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    order = T.length_grouped(lengths, 8, torch.Generator().manual_seed(1), mega=50)
    assert len(order) == 1000 and len(set(order)) == 1000     # 2 mega-batches of 400, then 25 batches of 203
    batches = [order[i:i + 8] for i in range(0, 1000, 8)]
    padded = lambda bs: sum(8 * max(lengths[j] for j in b) for b in bs) / sum(lengths[j] for b in bs for j in b)
    shuffled = torch.randperm(1003, generator=torch.Generator().manual_seed(1)).tolist()
    assert padded(batches) < 1.05 < 1.3 < padded([shuffled[i:i + 8] for i in range(0, 1000, 8)])
    longest = [max(lengths[j] for j in b) for b in batches]
    assert longest != sorted(longest, reverse=True)              # batch order is random, not by length
    assert T.length_grouped(lengths, 8, torch.Generator().manual_seed(1)) == order
    assert T.length_grouped(lengths, 8, torch.Generator().manual_seed(2)) != order


def test_fsdp_on_2_processes_gives_the_same_losses_and_checkpoint_as_one_process(world, tmp_path):
    # --fsdp shards W, the LLM's blocks and their Adam state over the processes (gloo on CPU).
    common = {"max-steps": 3, "batch-size": 8, "micro-batch-size": 4, "projector": "none"}
    run(flags(world, tmp_path / "one", "instruct.json", **{**common, "micro-batch-size": 8}))
    run(flags(world, tmp_path / "fsdp", "instruct.json", **common) + ["--fsdp"], nproc=2)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one, fsdp = LLaVA.from_pretrained(tmp_path / "one"), LLaVA.from_pretrained(tmp_path / "fsdp")
    for (name, a), b in zip(one.state_dict().items(), fsdp.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name           # the gathered checkpoint is the whole model


def test_killed_and_resumed_run_gives_the_same_loss_curve(world, tmp_path):
    common = {"max-steps": 8, "batch-size": 4, "micro-batch-size": 2, "save-every": 2, "projector": "none"}
    run(flags(world, tmp_path / "straight", "instruct.json", **common))
    p = run(flags(world, tmp_path / "killed", "instruct.json", **common), popen=True)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(log.read_text().splitlines()) < 8, "the run finished before it could be killed"
    run(flags(world, tmp_path / "killed", "instruct.json", **common) + ["--resume"])
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)


def test_tiny_model_overfits_a_handful_of_records(world, tmp_path):
    few = load_records(world / "instruct.json")[:4]
    (tmp_path / "few.json").write_text(json.dumps(few))
    run(flags(world, tmp_path / "fit", tmp_path / "few.json", projector="none", lr=3e-3,
              **{"max-steps": 160, "batch-size": 4, "micro-batch-size": 4, "warmup-ratio": 0.0}))
    curve = losses(tmp_path / "fit")
    assert curve[0] > 3.0 and curve[-1] < 0.05


def test_dataset_labels_and_image_expansion(world):
    tok = Tokenizer(world / "llm")
    records = load_records(world / "instruct.json")
    r = next(r for r in records if "image" in r)
    ds = LLaVADataset([r], world / "images", tok, "vicuna_v1", 64, True, 16, 4096)   # room for the whole record:
    item = ds[0]                                              # the tiny test tokenizer spells words in many pieces
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert len(ids) < 4096
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    assert item["image"].shape == (3, 64, 64) and item["length"] == len(ids) + 15
    supervised = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert supervised.replace(" ", "") == "".join(t["value"] for t in r["conversations"][1::2]).replace(" ", "")


def test_bad_records_are_named(world, tmp_path):
    good = load_records(world / "instruct.json")[0]
    bad = {**good, "id": "broken", "conversations": good["conversations"][:1] + good["conversations"][:1]}
    (tmp_path / "bad.json").write_text(json.dumps([good, bad]))
    with pytest.raises(DataError, match=r"bad.json record 1 \(id broken\): turn 1 is from 'human'"):
        load_records(tmp_path / "bad.json")
    missing = {**next(r for r in load_records(world / "instruct.json") if "image" in r), "image": "train/nope.png"}
    (tmp_path / "missing.json").write_text(json.dumps([missing]))
    r = subprocess.run([sys.executable, str(ROOT / "train_finetune.py")] +
                       flags(world, tmp_path / "o", tmp_path / "missing.json", projector="none"),
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "missing.json record 0" in r.stderr and "nope.png not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_too_long_conversations_are_truncated_with_a_named_warning(world, tmp_path):
    r = run(flags(world, tmp_path / "short", "instruct.json", projector="none",
                  **{"max-steps": 1, "batch-size": 8, "micro-batch-size": 8, "max-length": 300}))
    assert "is longer than --max-length; truncated" in r.stderr + r.stdout


def test_loss_curve_draws_the_raw_and_the_smoothed_loss(tmp_path):
    rows = [{"step": i + 1, "loss": 5.0 / (i + 1)} for i in range(40)]
    plot_loss(rows, tmp_path / "loss.png", "stage 1 (W only)")
    colours = {c for _, c in Image.open(tmp_path / "loss.png").convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {(190, 190, 190), (30, 90, 200)} <= colours          # the raw curve in gray, its average in blue
    plot_loss(rows[:1], tmp_path / "one.png", "one step")
    assert not (tmp_path / "one.png").exists()                   # a single point is no curve

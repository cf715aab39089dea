"""python -m minillava.toy: the toy world and its two tiny pretrained backbones, in one command.

    python -m minillava.toy [--out data/toy] [--n-train 4000] [--seed 0] [--clip-steps 480] [--lm-steps 360]

  1. the world (world.build_world): images, caps_boxes, pretrain.json, instruct.json, lm_corpus.json, bench.jsonl
  2. <out>/clip: a tiny CLIP trained contrastively on the captions, saved as an OpenAI CLIP folder
  3. <out>/llm:  a tiny chat LLaMA and its tokenizer.model, trained on lm_corpus.json, saved as a LLaMA folder

A part that is complete and was made with the same settings is skipped, so a re-run is instant;
a changed setting rebuilds that part (and the backbones, if the world changed). The measured
figures go to <out>/backbones.json. The defaults take about 2 minutes on a 2-core CPU with bf16
units (world ~8 s, CLIP ~45 s, LM ~80 s); --clip-steps and --lm-steps scale the two trainings.
Stage 1 (train_pretrain.py) then starts from <out>/clip and <out>/llm.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..training import cli, cpu_dtype
from .backbones import BACKBONES_VERSION, train_clip
from .lm import train_lm
from .world import VERSION, build_world, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillava.toy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/toy", help="folder for the world and the backbones")
    parser.add_argument("--n-train", type=int, default=4000, help="training scenes")
    parser.add_argument("--n-test", type=int, default=200, help="held-out scenes (bench, retrieval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-steps", type=int, default=480, help="tiny CLIP steps of 64 image-caption pairs")
    parser.add_argument("--lm-steps", type=int, default=360, help="tiny LLaMA steps of 16 chats")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="bf16 autocast (default where the CPU has bf16 units) or fp32")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    out = Path(args.out)
    dtype = args.dtype or cpu_dtype()
    report_file = out / "backbones.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    lines, t_total = [], time.perf_counter()

    # 1. The world. world.json is written last, so its presence means the build finished.
    world = {"version": VERSION, "seed": args.seed, "n_train": args.n_train, "n_test": args.n_test}
    world_file = out / "world.json"
    info = json.loads(world_file.read_text()) if world_file.exists() else {}
    if all(info.get(k) == v for k, v in world.items()):
        lines.append(f"world  skipped (complete, built in {report.get('world', {}).get('seconds', '?')} s)")
    else:
        t = time.perf_counter()
        build_world(str(out), args.n_train, args.n_test, args.seed, progress=args.progress)
        report["world"] = {"settings": world, "seconds": round(time.perf_counter() - t, 1)}
        write_json(str(report_file), report)
        lines.append(f"world  {report['world']['seconds']:6.1f} s  {args.n_train} train / {args.n_test} test scenes")

    # 2, 3. The backbones. Each folder is written atomically (saving.atomic_dir), and its settings
    # are recorded in backbones.json only after it is saved, so "recorded" means "complete".
    parts = [("clip", train_clip, args.clip_steps), ("llm", train_lm, args.lm_steps)]
    for name, train, steps in parts:
        settings = {"world": world, "version": BACKBONES_VERSION, "steps": steps, "seed": args.seed, "dtype": dtype}
        if report.get(name, {}).get("settings") == settings and (out / name / "config.json").exists():
            lines.append(f"{name:<5}  skipped (complete, built in {report[name]['seconds']} s)")
            continue
        figures = train(str(out), out / name, steps=steps, seed=args.seed, dtype=dtype,
                        progress=args.progress)
        report[name] = {"settings": settings, **figures}
        write_json(str(report_file), report)
        speed = f"{steps} steps x {figures['batch_size']}, {figures['step_ms']} ms/step ({dtype})"
        if name == "clip":
            result = (f"held-out retrieval top-1 {100 * figures['retrieval_top1']:.1f}% "
                      f"(chance {100 * figures['retrieval_chance']:.1f}%)")
        else:
            result = (f"held-out answer loss {figures['heldout_answer_loss']:.3f}, short answers "
                      f"{100 * figures['heldout_short_answer_accuracy']:.0f}% right; tokenizer {figures['tokenizer_seconds']} s")
        lines.append(f"{name:<5}  {figures['seconds']:6.1f} s  {speed}; {result}")
        if name == "llm":
            for sample in figures["samples"][:3]:    # a held-out scene told in words, greedy answers
                print(f"\nUSER: {sample['question']}\nASSISTANT: {sample['answer']}\n(reference: {sample['reference']})")

    print("\n" + "\n".join(lines) + f"\ntotal  {time.perf_counter() - t_total:6.1f} s   figures in {report_file}")
    toy_flags = "" if args.out == "data/toy" else (f" --recipe toy --data {out / 'pretrain.json'} --image-folder "
                                                   f"{out / 'images'} --vision {out / 'clip'} --llm {out / 'llm'}")
    print(f"next, stage 1: python train_pretrain.py{toy_flags}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count())   # every core (the training scripts share them out under torchrun)
    cli(main)

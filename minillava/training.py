"""What both training stages share: the recipe table, flags, torchrun setup, batching, the
accumulation step, the schedule, resumable state and the step log (the loss curve: plot.py).

The two scripts (train_pretrain.py, train_finetune.py) read top to bottom as the story of a
stage; the plumbing that would be written twice lives here.
"""
import argparse
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from .constants import IGNORE_INDEX
from .data import collate

# ---------------------------------------------------------------- recipes (llava-facts section 7)
# "llava-1.5" and "llava" are the published recipes; "toy" scales them to the toy world on a laptop
# CPU: a tiny LM trained from scratch needs a far larger learning rate than a 7B Vicuna, and 4000 images
# need smaller batches to give the optimizer enough steps (toy stage 2, one epoch: batch 32 gave colour
# 33.5%, batch 8 58%), and more passes (2 epochs of each part; see README). AdamW, weight decay 0, warmup
# 0.03, cosine. Stage 2 batches records of similar length, as LLaVA-1.5's does (toy: a fifth less time a step).
RECIPES = {
    "pretrain": {
        "llava": dict(lr=2e-3, batch_size=128, micro_batch_size=16, epochs=1, max_length=2048),
        "llava-1.5": dict(lr=1e-3, batch_size=256, micro_batch_size=32, epochs=1, max_length=2048),
        "toy": dict(lr=1e-3, batch_size=32, micro_batch_size=32, epochs=1, max_length=512),
    },
    "finetune": {
        "llava": dict(lr=2e-5, batch_size=32, micro_batch_size=4, epochs=3, max_length=2048),
        "llava-1.5": dict(lr=2e-5, batch_size=128, micro_batch_size=16, epochs=1, max_length=2048,
                          group_by_length=True),  # its group_by_modality_length
        "toy": dict(lr=5e-4, batch_size=8, micro_batch_size=8, epochs=2, max_length=512, group_by_length=True),
    },
}
TOY = "data/toy"          # where `python -m minillava.toy` builds the toy world


def parser(stage, description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--vision", help=f"CLIP folder (OpenAI layout) [toy: {TOY}/clip]")
    a("--llm", help=f"LLaMA/Vicuna folder with tokenizer.model [toy: {TOY}/llm]")
    a("--data", help=f"LLaVA JSON records [toy: the toy world's file; a file in {TOY} also gets the toy recipe]")
    a("--image-folder", help=f"folder the records' `image` paths are relative to [toy: {TOY}/images]")
    a("--out", help="output folder (model, log.jsonl, loss.png, train_args.json, resume state)")
    a("--conv-mode", help="prompt template [pretrain: plain, finetune: vicuna_v1, as LLaVA-1.5]")
    a("--recipe", choices=sorted(RECIPES[stage]), help="default hyperparameters: 'toy' for the toy world's "
      "data (the default), else 'llava-1.5' (the flags below override single values)")
    a("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine decay)")
    a("--batch-size", type=int, help="global batch = micro-batch x accumulation steps x processes")
    a("--micro-batch-size", type=int, help="sequences per process per forward pass")
    a("--epochs", type=float, help="passes over the data")
    a("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    a("--warmup-ratio", type=float, default=0.03, help="fraction of steps with linear warmup (paper: 0.03)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping (the original's default, 1.0)")
    a("--max-length", type=int, help="tokens per sequence, counted with the image expanded (paper: 2048)")
    a("--seed", type=int, default=0)
    a("--dtype", choices=["bf16", "fp32"], help="bf16 autocast (default where the hardware has it) or fp32")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="recompute LLaMA blocks in backward to save memory (paper: on; not needed at toy size)")
    a("--resume", action=argparse.BooleanOptionalAction, default=False,
      help="continue from --out/trainer_state.pt: same model, optimizer, schedule, data order and step")
    a("--save-every", type=int, default=0, help="write resumable state every N steps (0: only at the end)")
    a("--workers", type=int, help="DataLoader worker processes per process [2 with a GPU; 0 on a CPU, "
      "where workers take cores from the training itself]")
    a("--group-by-length", action=argparse.BooleanOptionalAction,
      help="batch records of similar length together, to pad less [recipe: on in LLaVA-1.5's and the toy's stage 2]")
    a("--log-every", type=int, default=1, help="progress-bar refresh interval in steps")
    return p


def resolve(args, stage, toy_data):
    """Fill defaults from the recipe and the toy world; compute gradient accumulation."""
    toy = args.data is None or Path(args.data).parent == Path(TOY)   # the toy world's data: its recipe and backbones
    recipe = RECIPES[stage][args.recipe or ("toy" if toy else "llava-1.5")]
    for k, v in {"group_by_length": False, **recipe}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if toy:
        args.data, args.image_folder = args.data or f"{TOY}/{toy_data}", args.image_folder or f"{TOY}/images"
        args.vision, args.llm = args.vision or f"{TOY}/clip", args.llm or f"{TOY}/llm"
    needed = ("image_folder",) if getattr(args, "model", None) else ("vision", "llm", "image_folder")  # --model: all inside
    missing = [f"--{k.replace('_', '-')}" for k in needed if getattr(args, k) is None]
    if missing:
        raise SystemExit(f"error: with --data, also give {' '.join(missing)}")
    if args.workers is None:
        args.workers = 2 if torch.cuda.is_available() else 0
    if args.dtype is None:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.dtype = "bf16" if cuda_bf16 or cpu_has_bf16() else "fp32"
    return args


def cpu_has_bf16():
    """AMX / AVX-512-BF16 make bf16 matmuls several times faster than fp32 on a CPU; without them
    bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not torch.cuda.is_available() and ("amx_bf16" in flags or "avx512_bf16" in flags)


def cpu_dtype():
    """The toy world's default on a CPU: "bf16" where the hardware has it (cpu_has_bf16), else "fp32"."""
    return "bf16" if cpu_has_bf16() else "fp32"


def ensure_toy_world(args):
    """The toy defaults build what is missing of the toy world (a complete one is skipped in seconds)."""
    toy_parts = (args.data, args.vision, args.llm)
    if all(Path(p).parent == Path(TOY) for p in toy_parts) and not all(Path(p).exists() for p in toy_parts):
        print0("the toy world is not complete: building it first (python -m minillava.toy)")
        from .toy.__main__ import main as build_toy
        if rank() == 0:
            build_toy([])
        barrier()

# ---------------------------------------------------------------- torchrun


def setup_distributed():
    """torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; a plain `python` run is one process.
    NCCL between GPUs, gloo between CPU processes."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))   # share the cores, don't fight
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish_distributed():
    """Leave together, then close the process group. On a CPU, gloo's worker threads free the last
    collectives' tensors just after those return, which needs the GIL: a short pause lets them, where a
    process that exits at once can abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
        if gloo:
            time.sleep(0.2)


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def all_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def wrap(model, device, world, fsdp=False, find_unused=False, dtype="bf16"):
    """DDP keeps a full copy per GPU and all-reduces gradients; FSDP shards weights, gradients and
    Adam state across GPUs (what a 7B fine-tune needs: 7B x 16 bytes = 112 GB)."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # fp32 master shards; each block is gathered in bf16 for compute, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32)
        for layer in model.language_model.model.layers:       # one shard group per decoder block
            fully_shard(layer, mp_policy=mp)
        fully_shard(model.vision_tower)                        # frozen, already bf16: a group of its own
        return fully_shard(model, mp_policy=mp)
    # A micro-batch of text-only records leaves W unused: DDP must be told to expect that.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def grad_sync(model, enabled):
    """Inner accumulation steps skip the gradient all-reduce; only the last one communicates."""
    if isinstance(model, DDP):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):                    # FSDP2
        model.set_requires_gradient_sync(enabled)
    return nullcontext()

# ---------------------------------------------------------------- data order and the step


def steps_per_epoch(dataset, args, world):
    per_process = len(dataset) // world
    return per_process // (args.micro_batch_size * args.accum)


def length_grouped(lengths, batch, generator, mega=50):
    """An epoch's order in which each global batch holds records of similar length, so padding
    wastes little (HF Trainer's group_by_length; LLaVA-1.5 trains with a variant of it): cut a
    random permutation into mega-batches of `mega` global batches, sort each by length, cut it
    into batches, and shuffle the batches. Incomplete batches are dropped."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for i in range(0, len(perm), mega * batch):
        chunk = sorted(perm[i:i + mega * batch], key=lambda j: lengths[j], reverse=True)
        batches += [chunk[k:k + batch] for k in range(0, len(chunk) - batch + 1, batch)]
    return [j for k in torch.randperm(len(batches), generator=generator).tolist() for j in batches[k]]


def global_batches(dataset, args, world, start, total):
    """Yield (step, micro-batches of this process) from `start` to `total` across epochs.
    Every process draws the same epoch order (seed + epoch) and takes every world-th sample of it,
    so the global batch is the same whatever the world size (DistributedSampler's rule). A resumed
    run skips, without loading them, the micro-batches the interrupted run had already used."""
    per_epoch = steps_per_epoch(dataset, args, world)
    lengths = dataset.lengths() if args.group_by_length else None
    step = start
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(args.seed + epoch)
        order = length_grouped(lengths, args.batch_size, g) if lengths else \
            torch.randperm(len(dataset), generator=g).tolist()
        order, m = order[:len(order) // world * world][rank()::world], args.micro_batch_size
        micro = [order[i:i + m] for i in range(0, len(order) - m + 1, m)][offset * args.accum:]
        loader = iter(DataLoader(dataset, batch_sampler=micro, collate_fn=collate, num_workers=args.workers))
        for step in range(step, min(total, (epoch + 1) * per_epoch)):
            yield step, [next(loader) for _ in range(args.accum)]
        step += 1


def train_step(model, group, device, dtype, world):
    """One optimizer step's forward/backward over `group`, this process's micro-batches.

    The loss is the mean over the supervised tokens of the whole global batch: count them
    first (all processes, all micro-batches), then backpropagate sum / count for each micro-batch.
    DDP and FSDP average gradients over processes, so the sum is scaled by `world` to undo that.
    The result does not depend on how the batch is split across processes or micro-batches."""
    n_local = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in group)
    n = all_sum(torch.tensor(float(n_local), device=device)).clamp(min=1)
    total = torch.zeros((), device=device)
    tokens = all_sum(torch.tensor(float(sum(mb["n_tokens"] for mb in group)), device=device))
    for i, mb in enumerate(group):
        with grad_sync(model, enabled=i == len(group) - 1):
            with mixed_precision(device.type, dtype):
                images = mb["images"].to(device) if mb["images"] is not None else None
                loss_sum = model(mb["input_ids"].to(device), images, mb["labels"].to(device))
            (loss_sum * world / n).backward()
        total += loss_sum.detach().float()
    return (all_sum(total) / n).item(), int(tokens.item())


@contextmanager
def mixed_precision(device_type, dtype):
    """bf16 autocast (weights and optimizer state stay fp32, as LLaVA trains in bf16). On CPU in bf16 the
    unfused "math" attention trains faster than the fused kernel (measured on the toy LLaVA's stage 2:
    9.8k vs 7.4k tokens/s; its backward is the slow part), so it is chosen there."""
    math_sdpa = device_type == "cpu" and dtype == "bf16"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"), \
            sdpa_kernel(SDPBackend.MATH) if math_sdpa else nullcontext():
        yield


def lr_at(step, total, args):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (as HF's trainer)."""
    warmup = math.ceil(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

# ---------------------------------------------------------------- resumable state


def save_state(path, model, optimizer, step, args):
    """Trainable weights + AdamW moments + step, gathered whole (also from FSDP shards), written to a
    temp file and renamed into place: a kill at any moment leaves the previous state intact."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    trainable = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    if rank() == 0:
        state = {"step": step, "model": {k: v for k, v in model_state.items() if k in trainable},
                 "optimizer": optim_state, "args": vars(args)}
        tmp = Path(str(path) + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    barrier()


def load_state(path, model, optimizer):
    state = torch.load(path, map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    return state["step"]


def full_state_dict(model):
    """The whole model's weights on CPU, gathered from FSDP shards if need be (same keys as unwrapped)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unwrap(model):
    return model.module if isinstance(model, DDP) else model

# ---------------------------------------------------------------- the step log


class StepLog:
    """Every step as one JSON line in out/log.jsonl, a tqdm bar with loss, lr, tokens/s and ETA."""

    def __init__(self, out, total, start, resumed):
        from tqdm import tqdm
        self.path, self.rows = Path(out) / "log.jsonl", []
        if resumed and self.path.exists():      # forget steps after the state we resumed from
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= start]
        if rank() == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.bar = tqdm(total=total, initial=start, disable=rank() != 0, dynamic_ncols=True, unit="step")
        self.t, self.warnings = time.time(), 0

    def step(self, step, loss, lr, tokens, group, every=1):
        for mb in group:      # data problems are named, never silent
            for where in mb["truncated"]:
                self.warn(f"warning: {where} is longer than --max-length; truncated")
            for where in mb["empty"]:
                self.warn(f"warning: {where} has no supervised token left (truncated away?); it adds no loss")
        now = time.time()
        row = {"step": step, "loss": round(loss, 5), "lr": lr, "tokens": tokens,
               "tok_per_s": round(tokens / max(now - self.t, 1e-9), 1)}
        self.t = now
        self.rows.append(row)
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.update(1)
            if step % every == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_per_s']:.0f}")

    def warn(self, message):
        self.warnings += 1
        if rank() == 0 and self.warnings <= 20:
            self.bar.write(message + (" (further warnings are only counted)" if self.warnings == 20 else ""))

    def close(self):
        self.bar.close()
        if self.warnings:
            print0(f"{self.warnings} data warnings (see above)")


def cli(main):
    """Run a script's main: bad input ends in one line naming the file and record, not a traceback."""
    from .checkpoint import CheckpointError
    from .conversation import ConversationError
    from .data import DataError
    try:
        main()
    except (DataError, CheckpointError, ConversationError, FileNotFoundError) as e:
        # DataLoader workers re-raise with the worker's traceback in the message: keep its last line
        message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__name__}: ")
        raise SystemExit(f"error: {message}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run again with --resume to continue from the last saved state") from None


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)

"""Stage 2 of LLaVA: fine-tuning end to end on visual instructions (paper section 4.2).

CLIP stays frozen and runs without gradients; W (from stage 1) and the LLM both learn, on
multi-turn instruction data: LLaVA-Instruct-158K (conversation, detailed description, complex
reasoning) or LLaVA-1.5's mix665k, whose text-only records (no `image`) share batches with
image records. The loss covers each answer X_a and its </s>, nothing else (vicuna_v1 template).

  python train_finetune.py --data data/toy/places.json --out runs/places   # the toy recipe in two parts: the places
  python train_finetune.py --model runs/places     # lists from stage 1 (runs/pretrain), then the instructions
  torchrun --nproc_per_node 8 train_finetune.py --fsdp --vision checkpoints/openai--clip-vit-large-patch14-336 \\
      --llm checkpoints/lmsys--vicuna-7b-v1.5 --projector runs/pretrain-7b \\
      --data llava_v1_5_mix665k.json --image-folder images --out runs/finetune-7b --grad-checkpointing

Writes --out as a llava-hf checkpoint (model.safetensors + config.json + tokenizer.model) that
chat.py, LLaVA.from_pretrained and transformers all open, plus log.jsonl, loss.png,
train_args.json and trainer_state.pt for --resume.
"""
import os

import torch

from minillava import LLaVA
from minillava import training as T
from minillava.plot import plot_loss
from minillava.saving import save_llava
from minillava.data import LLaVADataset, check_images, load_records
from minillava.tokenizer import Tokenizer


def main(argv=None):
    # 1. arguments: the recipe table fills what is not given (toy world, or LLaVA-1.5's stage 2)
    p = T.parser("finetune", __doc__)
    p.add_argument("--projector", help="stage-1 output (folder, or the original mm_projector.bin); "
                   "'none' starts W from random, the paper's no-pre-training ablation [toy: runs/pretrain]")
    p.add_argument("--projector-type", default="mlp2x_gelu", choices=["linear", "mlp2x_gelu"],
                   help="W's architecture; must match the stage-1 file")
    p.add_argument("--projector-lr", type=float,
                   help="a separate learning rate for W (the original's mm_projector_lr) [default: --lr]")
    p.add_argument("--model", help="start from a whole LLaVA instead of --llm + --projector: a stage-2 output, a "
                   "llava-hf or an original LLaVA folder (W and the LLM go on from it, as when fine-tuning "
                   "llava-v1.5 on new data; --vision only for an original checkpoint whose CLIP is not inside)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and Adam state over the GPUs (7B and up) instead of DDP")
    args = T.resolve(p.parse_args(argv), "finetune", "instruct.json")
    args.conv_mode, args.out = args.conv_mode or "vicuna_v1", args.out or "runs/finetune"
    if args.model and args.projector:
        raise SystemExit("error: --model brings its own W; drop --projector (or drop --model to start from stage 1)")
    args.projector = None if args.model else args.projector or "runs/pretrain"   # train_args.json says which

    # 2. distributed setup
    world, device = T.setup_distributed()
    torch.manual_seed(args.seed)
    T.ensure_toy_world(args)

    # 3. the model, and what is frozen: CLIP only. W and the LLM train in fp32 (master weights,
    # bf16 autocast computes); frozen CLIP can sit in bf16.
    if args.model:
        model = LLaVA.from_pretrained(args.model, vision_tower=args.vision, device=device)
        model.config.conv_mode = args.conv_mode
    else:
        if args.projector != "none" and not os.path.exists(args.projector):
            raise SystemExit(f"error: {args.projector} not found: run train_pretrain.py first, "
                             "or pass --projector none to skip stage 1 (the paper's ablation)")
        projector = None if args.projector == "none" else args.projector
        model = LLaVA.from_parts(args.vision, args.llm, args.projector_type, projector=projector,
                                 device=device, conv_mode=args.conv_mode)
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    if args.dtype == "bf16":
        model.vision_tower.to(torch.bfloat16)
    model.language_model.model.gradient_checkpointing = args.grad_checkpointing
    model.train()

    # 4. data: image and text-only records in the same batches, checked before the first step
    tok = Tokenizer(args.model or args.llm)
    records = load_records(args.data)
    check_images(records, args.image_folder, os.path.basename(args.data))
    cfg = model.config
    dataset = LLaVADataset(records, args.image_folder, tok, args.conv_mode, cfg.vision.image_size,
                           cfg.image_aspect_ratio == "pad", cfg.num_image_tokens, args.max_length,
                           os.path.basename(args.data))
    args.world, args.accum = world, args.batch_size // (args.micro_batch_size * world)
    if args.accum * args.micro_batch_size * world != args.batch_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x {world} processes")
    per_epoch = T.steps_per_epoch(dataset, args, world)
    if per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} records are fewer than one global batch of {args.batch_size}")
    total = args.max_steps or max(1, int(args.epochs * per_epoch))

    # 5. optimizer and schedule: AdamW on W + LLM, warmup then cosine
    text_only = any("image" not in r for r in records)      # then some micro-batches leave W unused
    ddp = T.wrap(model, device, world, fsdp=args.fsdp, find_unused=text_only, dtype=args.dtype)
    params = [q for q in ddp.parameters() if q.requires_grad]
    W = {id(q) for q in model.multi_modal_projector.parameters()}
    lr_W = args.lr if args.projector_lr is None else args.projector_lr      # 0 keeps W as it starts
    opt = torch.optim.AdamW([{"params": [q for q in params if id(q) not in W], "peak_lr": args.lr},
                             {"params": [q for q in params if id(q) in W], "peak_lr": lr_W}],
                            lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cpu")  # as stage 1
    state_file = os.path.join(args.out, "trainer_state.pt")
    start = T.load_state(state_file, ddp, opt) if args.resume and os.path.exists(state_file) else 0
    T.print0(f"stage 2: {len(dataset)} records, {total} steps of {args.batch_size} "
             f"({args.micro_batch_size} x {args.accum} accumulation x {world} processes, "
             f"{'FSDP' if args.fsdp and world > 1 else 'DDP' if world > 1 else 'one process'}), "
             f"{sum(q.numel() for q in params):,} trainable parameters, {args.dtype}, from step {start}")

    # 6. the loop
    log = T.StepLog(args.out, total, start, args.resume)
    for step, group in T.global_batches(dataset, args, world, start, total):
        lr = T.lr_at(step, total, args)
        for g in opt.param_groups:                  # one schedule, scaled to each group's peak
            g["lr"] = lr * g["peak_lr"] / args.lr
        loss, tokens = T.train_step(ddp, group, device, args.dtype, world)
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.step(step + 1, loss, lr, tokens, group, args.log_every)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            T.save_state(state_file, ddp, opt, step + 1, args)
    log.close()

    # 7. save: resumable state, then the whole LLaVA in the llava-hf layout (gathered from shards)
    T.save_state(state_file, ddp, opt, total, args)
    state = T.full_state_dict(ddp)
    if T.rank() == 0:
        model.vision_tower.float()                           # publish fp32 weights, as loaded
        save_llava(model, args.out, tok.file, state={k: v.float() for k, v in state.items()})
        T.write_json(os.path.join(args.out, "train_args.json"), {**vars(args), "total_steps": total})
        plot_loss(log.rows, os.path.join(args.out, "loss.png"), "stage 2 (W + LLM)")
        print(f"saved LLaVA to {args.out} (chat: python chat.py --model {args.out}); loss curve {args.out}/loss.png")
    T.finish_distributed()
    return model


if __name__ == "__main__":
    T.cli(main)

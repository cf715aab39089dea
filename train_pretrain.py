"""Stage 1 of LLaVA: pre-training for feature alignment (paper section 4.1).

CLIP (g) and the LLM are frozen; only the projection W learns, so that H_v = W(g(X_v)) lands
where the LLM expects word embeddings. The data are image-caption pairs: the caption is the
answer X_a to a brief-description instruction X_q (CC-595K in the paper, LCS-558K in LLaVA-1.5).
With the `plain` template (LLaVA-1.5) the instruction is dropped: <s> <image> caption \\n.

  python train_pretrain.py                       # the toy world (built on first use)
  torchrun --nproc_per_node 8 train_pretrain.py --vision checkpoints/openai--clip-vit-large-patch14-336 \\
      --llm checkpoints/lmsys--vicuna-7b-v1.5 --data blip_laion_cc_sbu_558k.json --image-folder images \\
      --out runs/pretrain-7b --grad-checkpointing

Writes --out/projector.safetensors + projector_config.json (W alone, what train_finetune.py
loads), log.jsonl, loss.png, train_args.json, and trainer_state.pt for --resume.
"""
import os

import torch

from minillava import LLaVA
from minillava import training as T
from minillava.plot import plot_loss
from minillava.saving import save_projector
from minillava.data import LLaVADataset, check_images, load_records
from minillava.tokenizer import Tokenizer


def main(argv=None):
    # 1. arguments: the recipe table fills what is not given (toy world, or LLaVA-1.5's stage 1)
    p = T.parser("pretrain", __doc__)
    p.add_argument("--projector", default="mlp2x_gelu", choices=["linear", "mlp2x_gelu"],
                   help="W: 'linear' (the paper) or 'mlp2x_gelu' (LLaVA-1.5, default)")
    p.add_argument("--vision-feature-layer", type=int, default=-2,
                   help="CLIP layer fed to W: -2, the penultimate (paper), or -1 for the ablation")
    args = T.resolve(p.parse_args(argv), "pretrain", "pretrain.json")
    args.conv_mode, args.out = args.conv_mode or "plain", args.out or "runs/pretrain"

    # 2. distributed setup: one process per GPU under torchrun, or one plain process
    world, device = T.setup_distributed()
    torch.manual_seed(args.seed)
    T.ensure_toy_world(args)

    # 3. the model, and what is frozen: everything but W. Frozen weights can live in bf16.
    frozen_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = LLaVA.from_parts(args.vision, args.llm, args.projector, dtype=frozen_dtype, device=device,
                             vision_feature_layer=args.vision_feature_layer, conv_mode=args.conv_mode)
    model.requires_grad_(False)
    model.multi_modal_projector.float().requires_grad_(True)    # W trains in fp32 (master weights)
    model.language_model.model.gradient_checkpointing = args.grad_checkpointing
    model.train()

    # 4. data: LLaVA JSON + image folder, checked before the first step
    tok = Tokenizer(args.llm)
    records = load_records(args.data)
    check_images(records, args.image_folder, os.path.basename(args.data))
    cfg = model.config
    dataset = LLaVADataset(records, args.image_folder, tok, args.conv_mode, cfg.vision.image_size,
                           cfg.image_aspect_ratio == "pad", cfg.num_image_tokens, args.max_length,
                           os.path.basename(args.data))
    # global batch = micro-batch x accumulation x processes, computed, never guessed
    args.world, args.accum = world, args.batch_size // (args.micro_batch_size * world)
    if args.accum * args.micro_batch_size * world != args.batch_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x {world} processes")
    per_epoch = T.steps_per_epoch(dataset, args, world)
    if per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} records are fewer than one global batch of {args.batch_size}")
    total = args.max_steps or max(1, int(args.epochs * per_epoch))

    # 5. optimizer and schedule: AdamW on W alone, warmup then cosine
    ddp = T.wrap(model, device, world)
    params = [q for q in ddp.parameters() if q.requires_grad]
    # fused: on CPU torch's default AdamW updates tensor by tensor (CUDA's default is already batched)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cpu")
    state_file = os.path.join(args.out, "trainer_state.pt")
    start = T.load_state(state_file, ddp, opt) if args.resume and os.path.exists(state_file) else 0
    T.print0(f"stage 1: {len(dataset)} records, {total} steps of {args.batch_size} "
             f"({args.micro_batch_size} x {args.accum} accumulation x {world} processes), "
             f"W has {sum(q.numel() for q in params):,} parameters, {args.dtype}, from step {start}")

    # 6. the loop
    log = T.StepLog(args.out, total, start, args.resume)
    for step, group in T.global_batches(dataset, args, world, start, total):
        lr = T.lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, tokens = T.train_step(ddp, group, device, args.dtype, world)
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.step(step + 1, loss, lr, tokens, group, args.log_every)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            T.save_state(state_file, ddp, opt, step + 1, args)
    log.close()

    # 7. save: resumable state, then W alone with what stage 2 needs to rebuild the rest
    T.save_state(state_file, ddp, opt, total, args)
    if T.rank() == 0:
        save_projector(model, args.out, {"vision": args.vision, "llm": args.llm, "conv_mode": args.conv_mode})
        T.write_json(os.path.join(args.out, "train_args.json"), {**vars(args), "total_steps": total})
        plot_loss(log.rows, os.path.join(args.out, "loss.png"), "stage 1 (W only)")
        print(f"saved W to {args.out}/projector.safetensors; loss curve {args.out}/loss.png")
    T.finish_distributed()
    return model


if __name__ == "__main__":
    T.cli(main)

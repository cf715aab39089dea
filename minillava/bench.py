"""python -m minillava.bench: minillava against transformers, same weights, same process.

One random-weight LLaVA is written once (llava-hf layout) and loaded by both; each workload
runs alternately for the two, several times, and the table shows medians and the ratio
minillava / transformers (higher is better for speed, lower for memory):

  train    forward + backward of a stage-2 batch (N_v visual tokens + text, loss on the answer), tokens/s
  prefill  one image + prompt, time to the first new token
  decode   greedy tokens/s at batch 1 and 8 (EOS disabled, the same number of new tokens)
  memory   peak RSS on CPU (each implementation in a fresh process), peak allocated on CUDA

transformers is needed here only as the reference (pip install -r requirements-test.txt).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import LLaVA
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# name: (vision config, text config, text tokens per training row, answer tokens, batch)
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1000), 32, 16, 2),
    "cpu": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=16),
            dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
                 vocab_size=32000), 96, 48, 4),
    "7b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                patch_size=14, projection_dim=768),
           dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064,
                rms_norm_eps=1e-5, max_position_embeddings=4096), 512, 256, 4),
}
IMAGE_ID = 3    # transformers' in-vocabulary image token for this random model


def write_checkpoint(size, folder, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision, text, *_ = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                      image_token_index=IMAGE_ID, image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)
    with torch.device("cuda" if size == "7b" and torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16 if size == "7b" else torch.float32)
    model.save_pretrained(folder)


def load(impl, folder, device, dtype):
    if impl == "minillava":
        return LLaVA.from_pretrained(folder, dtype=dtype, device=device)
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0   # never stop early
    return model


def batch(size, n, device, seed=0):
    """n prompts: BOS, 4 tokens, the image, the rest; minillava's (one -200) and transformers' (N_v ids)."""
    vision, text, T, answer, _ = SIZES[size]
    n_v = (vision["image_size"] // vision["patch_size"]) ** 2
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, text["vocab_size"], (n, T), generator=g)
    ids[:, 0], ids[:, 5] = 1, IMAGE_TOKEN_INDEX
    hf_ids = torch.cat([ids[:, :5], torch.full((n, n_v), IMAGE_ID), ids[:, 6:]], dim=1)
    labels = ids.clone()
    labels[:, :-answer] = IGNORE_INDEX                          # stage 2: loss on the answer only
    hf_labels = torch.cat([labels[:, :5], torch.full((n, n_v), IGNORE_INDEX), labels[:, 6:]], dim=1)
    images = torch.randn(n, 3, vision["image_size"], vision["image_size"], generator=g)
    to = lambda *xs: [x.to(device) for x in xs]
    return to(ids, labels, hf_ids, hf_labels, images), n_v


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def workloads(impl, model, size, device, dtype, new_tokens):
    """name -> (function, amount of work) for one implementation; seconds are measured outside."""
    (ids, labels, hf_ids, hf_labels, images), n_v = batch(size, SIZES[size][4], device)
    train_tokens = hf_ids.numel()

    def train():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
            if impl == "minillava":
                loss = model(ids, images, labels) / (labels[:, 1:] != IGNORE_INDEX).sum()
            else:
                loss = model(input_ids=hf_ids, pixel_values=images.to(dtype), labels=hf_labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def generate(n, count):
        (p_ids, _, p_hf, _, p_img), _ = batch(size, n, device, seed=1)
        with torch.no_grad():
            if impl == "minillava":
                return lambda: model.generate(p_ids, p_img.to(dtype), max_new_tokens=count, eos_token_id=-1)
            return lambda: model.generate(input_ids=p_hf, pixel_values=p_img.to(dtype), max_new_tokens=count,
                                          min_new_tokens=count, do_sample=False)
    return {"train": (train, train_tokens), "prefill": (generate(1, 1), 1), "prefill8": (generate(8, 1), 8),
            "gen1": (generate(1, new_tokens), new_tokens), "gen8": (generate(8, new_tokens), 8 * new_tokens)}


def measure(folder, size, device, dtype, repeats, new_tokens):
    """Alternate the two implementations on every workload; return medians."""
    impls = ["minillava", "transformers"]
    models = {impl: load(impl, folder, device, dtype) for impl in impls}
    for m in models.values():
        if hasattr(m, "vision_tower"):
            m.vision_tower.requires_grad_(False)
        else:
            m.model.vision_tower.requires_grad_(False)           # CLIP is frozen in LLaVA: same for both
    work = {impl: workloads(impl, models[impl], size, device, dtype, new_tokens) for impl in impls}
    times = {impl: {k: [] for k in work[impl]} for impl in impls}
    for r in range(repeats + 1):                                  # repeat 0 warms up and is dropped
        for name in work["minillava"]:
            for impl in (impls if r % 2 else impls[::-1]):
                with torch.no_grad() if name != "train" else torch.enable_grad():
                    t = timed(work[impl][name][0], device)
                if r:
                    times[impl][name].append(t)
    out = {}
    for impl in impls:
        med = {k: statistics.median(v) for k, v in times[impl].items()}
        out[impl] = {
            "train_tok_s": work[impl]["train"][1] / med["train"],
            "prefill_ms": 1000 * med["prefill"],
            # decode rate: the time beyond the prefill of the same batch, per generated token
            "decode_b1_tok_s": (new_tokens - 1) / max(med["gen1"] - med["prefill"], 1e-9),
            "decode_b8_tok_s": 8 * (new_tokens - 1) / max(med["gen8"] - med["prefill8"], 1e-9),
        }
    return out


def peak_memory(impl, folder, size, device, dtype, new_tokens):
    """Run train + decode once for one implementation and report its peak memory in MB."""
    model = load(impl, folder, device, dtype)
    (model.vision_tower if impl == "minillava" else model.model.vision_tower).requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name, (fn, _) in workloads(impl, model, size, device, dtype, new_tokens).items():
        with torch.no_grad() if name != "train" else torch.enable_grad():
            fn()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM belongs to the process image; getrusage's
    ru_maxrss survives exec, so a child started by the bench would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                         # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def train_flops(size):
    """Model FLOPs of one training step: 6 N T for the LLM (forward + backward), the frozen CLIP
    forward only (2 N per image token), attention scores 6 T^2 D per layer, causal-halved."""
    vision, text, T_text, _, B = SIZES[size]
    n_v = (vision["image_size"] // vision["patch_size"]) ** 2
    T = T_text - 1 + n_v
    D, L, F_ = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]
    kv = text.get("num_key_value_heads", text["num_attention_heads"]) / text["num_attention_heads"]
    llm = L * (2 * D * D + 2 * D * D * kv + 3 * D * F_) + text["vocab_size"] * D     # blocks + lm_head
    Dv, Lv = vision["hidden_size"], vision["num_hidden_layers"]
    clip = Lv * (4 * Dv * Dv + 2 * Dv * vision["intermediate_size"])
    return B * (6 * llm * T + 6 * L * T * T * D / 2 + 2 * clip * (n_v + 1) + 6 * (Dv * D + D * D) * n_v)


def decode_floor(folder, device, dtype, repeats, batch_size):
    """The fastest a decode step can be on this machine: a (batch_size, D_in) input through every Linear
    of the LLM, each weight read once (the attention over the cache, norms and sampling are left out).
    At batch 1 this bound is memory bandwidth; at batch 8 it is also how fast the matmul library
    multiplies so few rows. Returns tokens/s."""
    linears = [m for m in load("minillava", folder, device, dtype).language_model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch_size, m.in_features, device=device, dtype=dtype) for m in linears]
    def step():
        for m, x in zip(linears, xs):
            m(x)
    with torch.no_grad():
        step()
        return batch_size / statistics.median(timed(step, device) for _ in range(5 * repeats))


def gpu_checks(folder, size, device):
    """On CUDA: does SDPA take the flash kernel in bf16, and how close is training to the matmul peak?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    model = load("minillava", folder, device, torch.bfloat16)
    model.vision_tower.requires_grad_(False)
    work = workloads("minillava", model, size, device, torch.bfloat16, 8)
    out = {}
    try:       # restricted to the flash backend, SDPA raises instead of falling back
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            work["train"][0]()
            with torch.no_grad():
                work["gen1"][0]()
        out["flash_only_run"] = "ok: training and decoding ran with SDPA restricted to FLASH_ATTENTION"
    except RuntimeError as e:
        out["flash_only_run"] = f"failed: {str(e).splitlines()[0]}"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work["train"][0]()
    names = {e.key for e in prof.key_averages()}
    out["attention_kernels"] = sorted(n for n in names if "flash" in n.lower() or "fmha" in n.lower() or "attention" in n.lower())[:6]
    train = sorted(timed(work["train"][0], device) for _ in range(5))[2]
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    peak = 20 * 2 * 8192 ** 3 / timed(lambda: [a @ b for _ in range(20)], device) / 1e12
    out.update(train_step_s=train, train_tflops=train_flops(size) / train / 1e12, bf16_matmul_peak_tflops=peak)
    out["fraction_of_peak"] = out["train_tflops"] / peak
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu (default), 7b (a GPU), tiny (CI)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per workload (medians reported)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="the tiny size, 2 repeats, 8 tokens: proves it runs")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--folder", help="where to write the random checkpoint (default: a temp folder; /dev/shm is fast)")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.new_tokens = "tiny", 2, 8
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.memory_child:
        print(peak_memory(*args.memory_child, args.size, device, dtype, args.new_tokens))
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        write_checkpoint(args.size, folder)
        speed = measure(folder, args.size, device, dtype, args.repeats, args.new_tokens)
        for n in (1, 8):
            speed["minillava"][f"decode_b{n}_floor_tok_s"] = decode_floor(folder, device, dtype, args.repeats, n)
        print(json.dumps(speed), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            speed["gpu"] = gpu_checks(folder, args.size, device)
            print(json.dumps(speed["gpu"], indent=1), flush=True)
        for impl in ("minillava", "transformers"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                speed[impl]["peak_mb"] = peak_memory(impl, folder, args.size, device, dtype, args.new_tokens)
            else:   # RSS is per process: measure each implementation in a fresh one
                cmd = [sys.executable, "-m", "minillava.bench", "--memory-child", impl, folder] + \
                      [f"--size={args.size}", f"--dtype={args.dtype}", f"--device={args.device}",
                       f"--new-tokens={args.new_tokens}"]
                speed[impl]["peak_mb"] = float(subprocess.check_output(cmd, text=True).split()[-1])
    report(speed, args)


def cpu_name():
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        return names[0] if names else platform.processor() or "CPU"
    except OSError:
        return platform.processor() or "CPU"


def report(speed, args):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"minillava bench: size {args.size}, {args.dtype}, {device}, torch {torch.__version__}, commit {commit or '?'}, "
          f"medians of {args.repeats}")
    rows = [("train tokens/s", "train_tok_s", True), ("prefill ms", "prefill_ms", False),
            ("decode tokens/s, batch 1", "decode_b1_tok_s", True), ("decode tokens/s, batch 8", "decode_b8_tok_s", True),
            ("peak memory MB", "peak_mb", False)]
    print(f"| {'metric':26} | {'minillava':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 28}|{'-' * 12}:|{'-' * 14}:|{'-' * 7}:|")
    for label, key, higher in rows:
        a, b = speed["minillava"][key], speed["transformers"][key]
        ratio = a / b if higher else b / a          # > 1 means minillava is better
        print(f"| {label:26} | {a:10.1f} | {b:12.1f} | {ratio:5.2f}x |")
    print("ratio: how many times better minillava is (speed: minillava / transformers; "
          "prefill and memory: transformers / minillava)")
    floors = [speed["minillava"].get(f"decode_b{n}_floor_tok_s") for n in (1, 8)]
    if all(floors):
        print("decode bound: every Linear of the LLM once per step, nothing else, allows at most "
              f"{floors[0]:.1f} tokens/s at batch 1 and {floors[1]:.1f} at batch 8 here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "dtype": args.dtype, "device": device, "torch": torch.__version__,
                       "commit": commit, "repeats": args.repeats, "results": speed}, f, indent=2)


if __name__ == "__main__":
    main()

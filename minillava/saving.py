"""Writing checkpoints, atomically: the llava-hf layout (which transformers' LlavaForConditionalGeneration
loads too), an OpenAI-CLIP-style folder, a LLaMA folder, and stage 1's projector (checkpoint.py reads them all).

Every file of a save appears whole or not at all (atomic_dir), so a run killed while saving leaves the
previous checkpoint intact.
"""
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import expected_shapes


def llava_hf_config(config, dtype):
    """config.json in llava-hf form; what transformers does not know goes under "minillava"."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": config.vision.to_dict(), "text_config": config.text.to_dict(),
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        # transformers marks image positions with an in-vocabulary id; minillava uses -200 in input_ids.
        "image_token_index": config.image_token_index, "image_seq_length": config.num_image_tokens,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "minillava": {"projector_type": config.projector_type, "conv_mode": config.conv_mode,
                      "image_aspect_ratio": config.image_aspect_ratio},
    }

def atomic_dir(out_dir, write):
    """Run write(tmp) into a fresh temp folder, then rename each file into out_dir, weights first
    and config/index last: every file appears whole or not at all, and other files in out_dir
    (a training run's log, its resume state) stay. Weight files of an earlier save that the new
    one does not have are removed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    new = sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json")       # .json (config, index) last
    names = {f.name for f in new}
    for f in new:
        os.replace(f, out_dir / f.name)
    for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        if old.name not in names:
            old.unlink()
    tmp.rmdir()


def write_checkpoint(out_dir, state, config, copy_files=None, max_shard_bytes=4 << 30):
    """safetensors (sharded past max_shard_bytes, with the hub's index file) + config.json, atomically.
    copy_files: {name in the folder: source file}, e.g. {"tokenizer.model": ...}."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes

    def write(tmp):
        if len(shards) == 1:
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, keys in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: state[k] for k in keys}, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in keys})
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        for name, source in (copy_files or {}).items():
            shutil.copyfile(source, tmp / name)

    atomic_dir(out_dir, write)


def save_llava(model, out_dir, tokenizer_file=None, max_shard_bytes=4 << 30, state=None):
    """The llava-hf layout: minillava's parameter names are already the hub's names.
    `state`: a full state dict gathered elsewhere (from FSDP shards), else the model's own."""
    expected = expected_shapes(model)
    state = {k: v for k, v in (state or model.state_dict()).items() if k in expected}
    dtype = next(iter(state.values())).dtype
    write_checkpoint(out_dir, state, llava_hf_config(model.config, dtype),
                     {"tokenizer.model": tokenizer_file} if tokenizer_file else None, max_shard_bytes)


def save_clip(vision_model, out_dir):
    """An OpenAI-CLIP-style folder holding the vision half (`vision_model.*`) of a CLIP."""
    state = {f"vision_model.{k}": v for k, v in vision_model.state_dict().items()}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": vision_model.config.to_dict()}
    write_checkpoint(out_dir, state, config)


def save_llama(lm, out_dir, tokenizer_file):
    """A LLaMA folder as the hub has them: model.*, lm_head.*, config.json and tokenizer.model."""
    state = lm.state_dict()
    if lm.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = {"architectures": ["LlamaForCausalLM"], **lm.config.to_dict()}
    write_checkpoint(out_dir, state, config, {"tokenizer.model": tokenizer_file})


def save_projector(model, out_dir, meta):
    """Stage 1's output: W alone (`multi_modal_projector.*`) and what is needed to rebuild the rest."""
    W = {f"multi_modal_projector.{k}": v.detach().contiguous().cpu()
         for k, v in model.multi_modal_projector.state_dict().items()}
    config = model.config
    meta = {"projector_type": config.projector_type, "mm_hidden_size": config.vision.hidden_size,
            "hidden_size": config.text.hidden_size, "vision_feature_layer": config.vision_feature_layer,
            **meta}

    def write(tmp):
        save_file(W, tmp / "projector.safetensors", metadata={"format": "pt"})
        with open(tmp / "projector_config.json", "w") as f:
            json.dump(meta, f, indent=2)

    atomic_dir(out_dir, write)

"""Reading the checkpoint layouts people download (llava-facts section 2); saving.py writes them.

Each layout is one small table of key prefixes: checkpoint key -> minillava parameter name.
Loading is strict: every tensor the model needs is found, every tensor found is used (or is
a documented extra such as CLIP's text tower), every shape matches; errors name key and file.
minillava saves the llava-hf layout, which transformers' LlavaForConditionalGeneration loads too.
"""
import fnmatch
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .clip import CLIPVisionConfig
from .llama import LlamaConfig
from .llava import LLaVA, LLaVAConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the folder, file and key."""


# ---------------------------------------------------------------- key tables, one per layout
# (prefix in the file, prefix in minillava); the first matching row wins.

CLIP_KEYS = [("vision_model.", "vision_tower.vision_model.")]
LLAMA_KEYS = [("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
LLAVA_HF_KEYS = [                       # llava-hf on the hub, and the variants transformers writes
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
]
ORIGINAL_KEYS = [                       # liuhaotian/llava-*: LLaMA keys plus model.mm_projector
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),   # mlp2x_gelu: Linear, GELU, Linear
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_projector.", "multi_modal_projector.linear_1."),     # linear: a single Linear
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),  # when saved inside
] + LLAMA_KEYS
PROJECTOR_KEYS = [("multi_modal_projector.", "multi_modal_projector.")] + ORIGINAL_KEYS[:3]

# Tensors that checkpoints carry and LLaVA does not use.
IGNORED = ["text_model.*", "visual_projection.*", "text_projection.*", "logit_scale",
           "*position_ids", "*rotary_emb.inv_freq"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

# ---------------------------------------------------------------- reading files


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder):
    """The weight files of a folder: safetensors (single or sharded) first, else PyTorch .bin."""
    folder = Path(folder)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            return [folder / f for f in sorted(set(read_json(folder / index)["weight_map"].values()))]
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin found")


def iter_tensors(files):
    """Yield (key, shape, load, file); `load()` reads the tensor only when it is needed."""
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the index but missing")
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, tuple(f.get_slice(key).get_shape()), (lambda f=f, k=key: f.get_tensor(k)), file
        else:   # old releases: a pickle, read only as plain tensors (weights_only: no code runs)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch file ({e})") from None
            for key, t in state.items():
                yield key, tuple(t.shape), (lambda t=t: t), file


def rename(key, table):
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def collect(files, table, expected, dtype, device, only=None):
    """Tensors of `files` renamed by `table`, checked against `expected` {name: shape}.
    `only`: a prefix of minillava names this source provides (e.g. a CLIP folder: the tower)."""
    out = {}
    for key, shape, load, file in iter_tensors(files):
        if any(fnmatch.fnmatch(key, pattern) for pattern in IGNORED):
            continue
        name = rename(key, table)
        if name is None or name not in expected or (only and not name.startswith(only)):
            raise CheckpointError(f"{file}: unexpected tensor {key!r} (no place for it in this LLaVA)")
        if shape != expected[name]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)}, but the config implies "
                                  f"{list(expected[name])} for {name} (mismatched config or projector?)")
        out[name] = load().to(device=device, dtype=dtype)    # every LLaVA tensor is floating point
    return out


def assign(model, tensors, where):
    """Put the collected tensors into a model built on the meta device; refuse if any is missing."""
    expected = expected_shapes(model)
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor for {missing[0]}{more}")
    model.load_state_dict(tensors, strict=False, assign=True)
    lm = model.language_model
    if lm.config.tie_word_embeddings:   # assign=True replaced the shared Parameter: tie again
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return model.eval()


def expected_shapes(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.language_model.config.tie_word_embeddings:
        shapes.pop("language_model.lm_head.weight")    # shares embed_tokens' tensor
    return shapes

# ---------------------------------------------------------------- configs of each layout


def config_from_llava_hf(cfg):
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    extra = cfg.get("minillava", {})
    return LLaVAConfig(
        vision=CLIPVisionConfig.from_dict(cfg["vision_config"]),
        text=LlamaConfig.from_dict(cfg["text_config"]),
        projector_type=extra.get("projector_type", "mlp2x_gelu"),   # llava-hf always has the MLP
        vision_feature_layer=layer,
        vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
        image_aspect_ratio=extra.get("image_aspect_ratio", "pad"),
        conv_mode=extra.get("conv_mode", "vicuna_v1"),
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 0)))


def config_from_original(cfg, vision_cfg, name):
    if cfg.get("mm_use_im_start_end"):
        raise CheckpointError(f"{name}: mm_use_im_start_end=true (LLaVA v0 checkpoints) is not supported")
    projector_type = cfg.get("mm_projector_type", "linear")   # LLaVA v1 configs predate the key
    if projector_type not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"{name}: mm_projector_type {projector_type!r} is not supported (linear, mlp2x_gelu)")
    # The original repo picks the template from the model name; LLaVA-1.5 is evaluated with vicuna_v1.
    label = (str(name) + cfg.get("_name_or_path", "")).lower()
    conv_mode = ("llava_llama_2" if "llama-2" in label or "llama_2" in label
                 else "vicuna_v1" if "1.5" in label or projector_type == "mlp2x_gelu" else "llava_v1")
    select = cfg.get("mm_vision_select_feature", "patch")
    return LLaVAConfig(
        vision=vision_cfg, text=LlamaConfig.from_dict({**cfg, "model_type": "llama"}),
        projector_type=projector_type,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_aspect_ratio="pad" if cfg.get("image_aspect_ratio") == "pad" else "crop",
        conv_mode=conv_mode)


# ---------------------------------------------------------------- public entry points


def resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def meta_model(config):
    """Build the module tree without allocating memory or drawing random weights: the files supply
    every weight. (Random init on the meta device would also cost a second of imports.)"""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_")}
    for name in saved:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            return LLaVA(config)
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def clip_folder_config(folder):
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; expected an OpenAI CLIP folder "
                              "(e.g. python -m minillava.download openai/clip-vit-large-patch14-336)")
    return CLIPVisionConfig.from_dict(read_json(folder / "config.json"))


def load_llava(path, vision_tower=None, dtype=None, device=None):
    path, dtype, device = Path(path), resolve_dtype(dtype), device or "cpu"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / "projector_config.json").exists() and not (path / "config.json").exists():
        meta = read_json(path / "projector_config.json")        # a stage-1 output: W alone
        return build_llava(vision_tower or meta["vision"], meta["llm"], meta["projector_type"], path,
                           dtype=dtype, device=device)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json); get one with e.g. "
                              "python -m minillava.download llava-hf/llava-1.5-7b-hf")
    cfg = read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type == "llava" and "text_config" in cfg:                     # llava-hf and minillava
        config, table = config_from_llava_hf(cfg), LLAVA_HF_KEYS
        model = meta_model(config)
        tensors = collect(weight_files(path), table, expected_shapes(model), dtype, device)
    elif "mm_vision_tower" in cfg:                                         # original LLaVA
        tower = vision_tower or cfg["mm_vision_tower"]
        files = weight_files(path)
        inside = any(k.startswith("model.vision_tower.") for k, *_ in iter_tensors(files[-1:]))
        if not inside and not Path(tower).is_dir():
            raise CheckpointError(
                f"{path}: this original LLaVA checkpoint uses the vision tower {cfg['mm_vision_tower']!r}, "
                f"which is not a local folder; download it (python -m minillava.download "
                f"{cfg['mm_vision_tower']}) and pass its folder as vision_tower= / --vision-tower")
        config = config_from_original(cfg, clip_folder_config(tower), path)
        model = meta_model(config)
        expected = expected_shapes(model)
        tensors = collect(files, ORIGINAL_KEYS, expected, dtype, device)
        if not inside:
            tensors.update(collect(weight_files(tower), CLIP_KEYS, expected, dtype, device, only="vision_tower."))
    elif model_type == "llama":
        raise CheckpointError(f"{path}: a language model, not a LLaVA; build one with "
                              "LLaVA.from_parts(vision=CLIP_FOLDER, llm=this folder)")
    else:
        raise CheckpointError(f"{path}/config.json: unknown model_type {model_type!r}; minillava reads "
                              "llava (llava-hf, minillava) and original LLaVA (llava_llama with mm_vision_tower)")
    return assign(model, tensors, path)


def build_llava(vision, llm, projector_type="mlp2x_gelu", projector=None, dtype=None, device=None, **overrides):
    dtype, device = resolve_dtype(dtype), device or "cpu"
    projector_tensors_files = None
    if projector is not None:
        projector_tensors_files, found_type = projector_files(projector)
        meta = Path(projector) / "projector_config.json"
        if meta.exists():    # stage 1 chose the CLIP layer W was trained on: keep it
            overrides.setdefault("vision_feature_layer", read_json(meta)["vision_feature_layer"])
        if found_type != projector_type:
            raise CheckpointError(f"{projector}: holds a {found_type} projector, but {projector_type} was asked for")
    llm_cfg = read_json(Path(llm) / "config.json")
    config = LLaVAConfig(vision=clip_folder_config(vision), text=LlamaConfig.from_dict(llm_cfg),
                         projector_type=projector_type, **overrides)
    model = meta_model(config)
    expected = expected_shapes(model)
    tensors = collect(weight_files(vision), CLIP_KEYS, expected, dtype, device, only="vision_tower.")
    tensors.update(collect(weight_files(llm), LLAMA_KEYS, expected, dtype, device, only="language_model."))
    if projector_tensors_files is not None:
        tensors.update(collect(projector_tensors_files, PROJECTOR_KEYS, expected, dtype, device,
                               only="multi_modal_projector."))
    else:   # a fresh W, initialised as nn.Linear does (stage 1 trains it from here)
        W = model.multi_modal_projector.to_empty(device=device)
        for layer in W.children():
            layer.reset_parameters()
        tensors.update({f"multi_modal_projector.{k}": v.to(dtype) for k, v in W.state_dict().items()})
    return assign(model, tensors, f"{vision} + {llm}")


def projector_files(projector):
    """A stage-1 projector: a minillava folder (projector.safetensors) or the original mm_projector.bin."""
    p = Path(projector)
    file = p / "projector.safetensors" if p.is_dir() else p
    if not file.exists():
        alt = p / "mm_projector.bin"
        if not alt.exists():
            raise CheckpointError(f"{projector}: no projector.safetensors or mm_projector.bin")
        file = alt
    keys = [k for k, *_ in iter_tensors([file])]
    mlp = any(".linear_2." in k or ".2." in k for k in keys)
    return [file], "mlp2x_gelu" if mlp else "linear"

"""Tiny random checkpoints in the layouts people download, written with transformers.

Each builder returns the transformers model it saved, so a test can compare numbers.
Where the hub's layout differs from what transformers writes today, keys are renamed.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14)                        # N_v = 16
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=256)
IMAGE_TOKEN = 127   # for transformers' llava: an id the prompts in the tests never use


def clip_folder(out, seed=0):
    """An OpenAI CLIP folder (CLIPModel: vision + text towers)."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision_config=VISION, projection_dim=8,
                     text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model = CLIPModel(cfg).eval()
    model.save_pretrained(out)
    return model


def llama_folder(out, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TEXT, **overrides})).eval()
    model.save_pretrained(out)
    return model


def hf_llava(seed=0, linear=False, **text):
    """A transformers LlavaForConditionalGeneration. `linear=True` makes its projector equal to one
    Linear (identity activation, identity second layer), the reference for LLaVA v1's `linear`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**{**TEXT, **text}),
                      image_token_index=IMAGE_TOKEN, projector_hidden_act="linear" if linear else "gelu",
                      image_seq_length=16)
    model = LlavaForConditionalGeneration(cfg).eval()
    if linear:
        W2 = model.model.multi_modal_projector.linear_2
        with torch.no_grad():
            W2.weight.copy_(torch.eye(W2.weight.shape[0]))
            W2.bias.zero_()
    return model


def llava_hf_folder(out, model, shard="8KB"):
    """The llava-hf hub layout (`vision_tower.vision_model.*`, `language_model.model.*`), sharded."""
    model.save_pretrained(out, max_shard_size=shard)
    out = Path(out)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    renamed = {}
    for file in sorted(set(index["weight_map"].values())):
        state = load_file(out / file)
        state = {hub_name(k): v for k, v in state.items()}
        save_file(state, out / file, metadata={"format": "pt"})
        renamed.update({k: file for k in state})
    index["weight_map"] = renamed
    index_file.write_text(json.dumps(index))
    return out


def hub_name(key):
    # transformers 5 writes `vision_tower.embeddings...`; the hub's llava-1.5-7b-hf has `vision_tower.vision_model.`
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def original_llava_folder(out, clip_out, model, projector_type):
    """liuhaotian/llava-style: LLaMA keys + model.mm_projector in .bin shards, config naming a hub
    CLIP; the vision tower goes to a separate OpenAI CLIP folder `clip_out`."""
    from transformers import CLIPConfig, CLIPModel
    out, state = Path(out), model.state_dict()
    llm = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            llm["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            llm[k] = v
        elif k.startswith("model.multi_modal_projector."):
            rest = k[len("model.multi_modal_projector."):]
            if projector_type == "linear":
                if rest.startswith("linear_1."):
                    llm["model.mm_projector." + rest[len("linear_1."):]] = v
            else:
                llm["model.mm_projector." + rest.replace("linear_1.", "0.").replace("linear_2.", "2.")] = v
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(llm)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: llm[k].clone() for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = model.config.text_config.to_dict()
    cfg = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings")}
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", rope_theta=10000.0,
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=VISION["hidden_size"],
               mm_projector_type=projector_type, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               image_aspect_ratio="pad", mm_use_im_start_end=False, _name_or_path="llava-v1.5-7b")
    (out / "config.json").write_text(json.dumps(cfg))
    # The CLIP folder: a full CLIPModel whose vision half is the LLaVA's tower.
    clip = CLIPModel(CLIPConfig(vision_config=VISION, projection_dim=8,
                                text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(clip_out)
    return out


def hf_image_ids(input_ids, n_v=16):
    """minillava's prompt (one -200) -> transformers' (the image token repeated N_v times)."""
    out = []
    for row in input_ids:
        ids = []
        for t in row.tolist():
            ids += [IMAGE_TOKEN] * n_v if t == -200 else [t]
        out.append(ids)
    return torch.tensor(out)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# A small English corpus in the prompts' words, for a tokenizer whose vocabulary fits the tiny models.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "How many shapes are there? There are 3 shapes. What color is the circle? It is red.",
    "The triangle is at the top left of the picture. Describe the image concisely.",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> [/INST]",
]


def train_tokenizer(out_dir, vocab_size=400):
    """A SentencePiece tokenizer.model trained with LLaMA's settings (BPE, byte fallback, dummy
    prefix, ids 0 <unk>, 1 <s>, 2 </s>); build the tiny models with the same vocab_size."""
    import sentencepiece as spm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out / "tokenizer.model"

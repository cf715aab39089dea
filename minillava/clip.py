"""The vision encoder g: a CLIP ViT (OpenAI ViT-L/14 and any size from its config).

Parameters are named exactly as in OpenAI CLIP's `config.json` + safetensors on the hub
(`vision_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so loading is a plain copy.
Reading order: config -> attention -> MLP -> block -> embeddings -> the tower.
Shapes: B batch, N_v patches (576 at 336 px), D_v width (1024 for ViT-L).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPVisionConfig:
    # Defaults are transformers' CLIPVisionConfig defaults: hub configs leave out fields equal to them.
    hidden_size: int = 768              # D_v (1024 for ViT-L/14)
    intermediate_size: int = 3072       # MLP width (4096 for ViT-L/14)
    num_hidden_layers: int = 12         # 24 for ViT-L/14
    num_attention_heads: int = 12       # 16 for ViT-L/14
    image_size: int = 224               # 336 for the LLaVA-1.5 tower
    patch_size: int = 32                # 14 for ViT-L/14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"      # OpenAI CLIP's x * sigmoid(1.702 x)

    @classmethod
    def from_dict(cls, d):
        """From a `vision_config` dict (or a CLIP `config.json`, which nests it)."""
        d = d.get("vision_config", d)
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    def to_dict(self):
        return {"model_type": "clip_vision_model", **{f.name: getattr(self, f.name) for f in fields(self)}}

    @property
    def num_patches(self):  # N_v
        return (self.image_size // self.patch_size) ** 2


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # what OpenAI CLIP was trained with
    "gelu": F.gelu,
}

# ---------------------------------------------------------------- attention and MLP


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        B, N, D = x.shape
        # (B, N, D) -> (B, nh, N, hs): every patch attends to every patch (no causal mask)
        q, k, v = (proj(x).view(B, N, self.n_head, D // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)       # softmax(q k^T / sqrt(hs)) v
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

# ---------------------------------------------------------------- embeddings and the tower


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, P = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(D))
        # A conv with stride = kernel = patch size cuts the image into patches and projects each.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, D)  # learned, +1 for CLS

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values)                   # (B, D_v, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)                         # (B, N_v, D_v)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                           # (B, 1 + N_v, D_v)
        return x + self.position_embedding.weight.to(x.dtype)


class CLIPVisionTransformer(nn.Module):
    """`vision_model` of a CLIP checkpoint: embeddings -> pre_layrnorm -> encoder layers."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))))
        # Kept so that checkpoints round-trip unchanged; LLaVA never applies it (facts: no post-LN).
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values, feature_layer=-2):
        """Hidden states of `feature_layer`, counted like transformers' `hidden_states` tuple:
        entry 0 is the embedding output after pre_layrnorm, entry i the output of layer i.
        LLaVA takes -2, the penultimate layer: the paper's ablation loses 0.96 points with -1."""
        n_layers = len(self.encoder.layers)
        stop = feature_layer % (n_layers + 1)        # -2 -> n_layers - 1: the last layer is never run
        x = self.pre_layrnorm(self.embeddings(pixel_values))      # (B, 1 + N_v, D_v)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x


class CLIPVisionTower(nn.Module):
    """g(X_v) -> Z_v, as LLaVA uses it: the chosen layer, CLS dropped unless asked for."""

    def __init__(self, cfg, feature_layer=-2, select_strategy="default"):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {select_strategy!r}: expected 'default' (drop CLS) or 'full'")
        self.vision_model = CLIPVisionTransformer(cfg)
        self.feature_layer, self.select_strategy = feature_layer, select_strategy

    def forward(self, pixel_values):
        Z_v = self.vision_model(pixel_values, self.feature_layer)  # (B, 1 + N_v, D_v)
        return Z_v[:, 1:] if self.select_strategy == "default" else Z_v   # (B, N_v, D_v)

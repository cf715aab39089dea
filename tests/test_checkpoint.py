"""Loading is strict and loud; what minillava saves, transformers loads."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import tiny
from minillava import IMAGE_TOKEN_INDEX, LLaVA
from minillava.checkpoint import CheckpointError


@pytest.fixture
def llava_dir(tmp_path):
    model = tiny.hf_llava(seed=4)
    model.save_pretrained(tmp_path / "m")          # one file, transformers' own layout
    return tmp_path / "m"


def edit(folder, fn):
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_tensor_is_named(llava_dir):
    edit(llava_dir, lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor for language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        LLaVA.from_pretrained(llava_dir)


def test_a_wrong_shape_is_named_with_its_file(llava_dir):
    edit(llava_dir, lambda s: s.update({"multi_modal_projector.linear_1.weight": torch.zeros(48, 31)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'multi_modal_projector\.linear_1\.weight' "
                                              r"has shape \[48, 31\].*\[48, 32\]"):
        LLaVA.from_pretrained(llava_dir)


def test_an_unexpected_tensor_is_refused(llava_dir):
    edit(llava_dir, lambda s: s.update({"language_model.model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'language_model.model.layers.7"):
        LLaVA.from_pretrained(llava_dir)


def test_an_unknown_model_type_is_named(llava_dir):
    cfg = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_vl"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'qwen2_vl'"):
        LLaVA.from_pretrained(llava_dir)


def test_original_layout_without_a_local_vision_tower_says_what_to_do(tmp_path):
    folder = tiny.original_llava_folder(tmp_path / "o", tmp_path / "clip", tiny.hf_llava(), "mlp2x_gelu")
    with pytest.raises(CheckpointError, match="minillava.download openai/clip-vit-large-patch14-336"):
        LLaVA.from_pretrained(folder)


def test_minillava_checkpoint_round_trips_and_loads_in_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration
    model = LLaVA.from_pretrained(tiny.llava_hf_folder(tmp_path / "src", tiny.hf_llava(seed=6)))
    model.save_pretrained(tmp_path / "saved")
    again = LLaVA.from_pretrained(tmp_path / "saved")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 5, 9, IMAGE_TOKEN_INDEX, 13, 4, 22]])
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = model(ids, x)
        ref = hf(input_ids=tiny.hf_image_ids(ids), pixel_values=x).logits
    assert tiny.rel_err(ours, ref) < 1e-4

"""The LoRA gradient-parity reference (model/tests/trainable.rs): peft's LoRA (r=4, alpha=8 on q_proj and
v_proj, the defaults for CLIP) on the vision tower of transformers' CLIPModel of the tiny fixture, with seeded
nonzero A and B; one forward and backward of sum(image_embeds * w). Writes the inputs, the embeddings, and
every LoRA variable's value and gradient under our names (`vision_model....q_proj.lora_A`)."""
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPModel

checkpoint, out = sys.argv[1], sys.argv[2]
clip = CLIPModel.from_pretrained(checkpoint, dtype=torch.float32).eval()  # the fixture is stored in f16
# The vision tower's q_proj and v_proj (the text tower stays as it is: the prompts are encoded once).
targets = r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
model = get_peft_model(clip, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
g = torch.Generator().manual_seed(1)
lora = {}
for name, p in model.named_parameters():
    if "lora_" in name:
        p.data = torch.randn(p.shape, generator=g) * 0.2
        ours = name.removeprefix("base_model.model.").replace(".default.weight", "")
        lora[ours] = p
size = clip.config.vision_config.image_size
pixels = torch.randn(2, 3, size, size, generator=g)
w = torch.randn(2, clip.config.projection_dim, generator=g)
embeds = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
(embeds * w).sum().backward()
tensors = {"pixels": pixels, "w": w, "image_embeds": embeds.detach()}
for name, p in lora.items():
    tensors[f"value.{name}"] = p.detach().clone()
    tensors[f"grad.{name}"] = p.grad.clone()
save_file({k: v.contiguous() for k, v in tensors.items()}, out)
print(len(lora), "LoRA variables")

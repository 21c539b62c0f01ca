"""The backbone-adaptation gradient-parity reference (model/tests/trainable.rs), in transformers (+ peft for
LoRA) on a tiny fixture, in f32 and eval mode (no dropout):

    adapt_reference.py clip|dinov2|wav2vec2 lora|lora_mlp|last_blocks CHECKPOINT OUT

- clip: the vision tower of CLIPModel; one forward and backward of sum(image_embeds * w).
- dinov2: Dinov2Model (MLP variant); one forward and backward of sum(pooler_output * w). transformers names the
  projections q_proj, k_proj, v_proj, o_proj in memory; they are reported under the checkpoint's names
  (attention.attention.query, ..., attention.output.dense), which are ours.
- wav2vec2: Wav2Vec2Model; one forward and backward of sum_i sum(states[i] * w[i]) over every hidden state (as
  the weighted-sum adapter uses them) and the last hidden state.
- lora: peft's LoRA (r=4, alpha=8) on every layer's q_proj and v_proj (peft's defaults for CLIP), A and B drawn
  seeded and nonzero; lora_mlp: on each layer's two feed-forward linear layers too.
- last_blocks: the last layer trains (CLIP: with the post-layernorm and the projection), the rest is frozen.

Writes the inputs, the outputs, and every trained variable's value and gradient under our names
(`vision_model.encoder.layers.1.self_attn.q_proj.lora_A`, `encoder.layers.1.feed_forward.output_dense.weight`).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPModel, Dinov2Model, Wav2Vec2Model

tower, mode, checkpoint, out = sys.argv[1:5]
g = torch.Generator().manual_seed(1)
if tower == "clip":
    model = CLIPModel.from_pretrained(checkpoint, dtype=torch.float32).eval()  # the fixture is stored in f16
    layers = rf"vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    mlp = rf"vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)"
    last = model.config.vision_config.num_hidden_layers - 1
    tail = (f"vision_model.encoder.layers.{last}.", "vision_model.post_layernorm.", "visual_projection.")
elif tower == "dinov2":
    model = Dinov2Model.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layers = rf"encoder\.layer\.\d+\.attention\.(q_proj|v_proj)"
    mlp = rf"encoder\.layer\.\d+\.mlp\.(fc1|fc2)"
    last = model.config.num_hidden_layers - 1
    tail = (f"encoder.layer.{last}.", "layernorm.")
else:
    model = Wav2Vec2Model.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layers = rf"encoder\.layers\.\d+\.attention\.(q_proj|v_proj)"
    mlp = rf"encoder\.layers\.\d+\.feed_forward\.(intermediate_dense|output_dense)"
    last = model.config.num_hidden_layers - 1
    tail = (f"encoder.layers.{last}.",) + (("encoder.layer_norm.",) if model.config.do_stable_layer_norm else ())

for p in model.parameters():
    p.requires_grad_(False)
trained = {}
if mode in ("lora", "lora_mlp"):
    from peft import LoraConfig, get_peft_model

    targets = f".*({layers}|{mlp})" if mode == "lora_mlp" else f".*{layers}"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
            p.requires_grad_(True)
            trained[name.removeprefix("base_model.model.").replace(".default.weight", "")] = p
    base = model.base_model.model
else:
    for name, p in model.named_parameters():
        if name.startswith(tail):
            p.requires_grad_(True)
            trained[name] = p
    base = model


def ours(name):
    """The checkpoint's key of a parameter transformers names otherwise in memory (DINOv2's projections)."""
    if tower != "dinov2":
        return name
    for memory, hub in [(".attention.q_proj.", ".attention.attention.query."),
                        (".attention.k_proj.", ".attention.attention.key."),
                        (".attention.v_proj.", ".attention.attention.value."),
                        (".attention.o_proj.", ".attention.output.dense.")]:
        name = name.replace(memory, hub)
    return name


tensors = {}
if tower == "clip":
    size = base.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    w = torch.randn(2, base.config.projection_dim, generator=g)
    embeds = base.visual_projection(base.vision_model(pixel_values=pixels).pooler_output)
    (embeds * w).sum().backward()
    tensors.update(pixels=pixels, w=w, output=embeds.detach())
elif tower == "dinov2":
    size = base.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    w = torch.randn(2, base.config.hidden_size, generator=g)
    pooled = base(pixel_values=pixels).pooler_output
    (pooled * w).sum().backward()
    tensors.update(pixels=pixels, w=w, output=pooled.detach())
else:
    values = torch.randn(2, 4000, generator=g)
    result = base(values, output_hidden_states=True)
    # Every hidden state (the stable variant's are before its final layer norm) and the last hidden state.
    states = torch.cat([torch.stack(result.hidden_states), result.last_hidden_state[None]])
    w = torch.randn(states.shape, generator=g)
    (states * w).sum().backward()
    tensors.update(values=values, w=w, output=states.detach())
for name, p in trained.items():
    tensors[f"value.{ours(name)}"] = p.detach().clone()
    tensors[f"grad.{ours(name)}"] = p.grad.clone()
save_file({k: v.contiguous() for k, v in tensors.items()}, out)
print(len(trained), "trained variables")

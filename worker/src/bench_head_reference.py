"""Reference side of `worker bench-head`: the paper's trainable head written in PyTorch eager, module for module
what avexpr-model builds (TCN with weight-normed causal convs, audio adapter with the fps alignment, bi-directional
cross-attention, masked mean pooling, classifier, prompt head and the loss), timed forward + backward on random
features of the same shapes, same threads. Prints one JSON line with clips/s and the parameter count per group.
Also imported by scripts/bench_e2e_reference.py (the PyTorch way end to end): `configure(args)` first."""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

a, m = None, None


def configure(args):
    """The settings the modules read: encoder widths, the `model` section, threads."""
    global a, m
    a, m = args, args["model"]
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, cin, cout, k, dilation, p):
        super().__init__()
        self.pad, self.p = (k - 1) * dilation, p
        self.conv1 = weight_norm(nn.Conv1d(cin, cout, k, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(cout, cout, k, dilation=dilation))
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        out = F.dropout(F.relu(self.conv1(F.pad(x, (self.pad, 0)))), self.p, self.training)
        out = F.dropout(F.relu(self.conv2(F.pad(out, (self.pad, 0)))), self.p, self.training)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.q_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(3))
        self.k_proj = nn.Linear(d, d, bias=False)  # as ours: softmax ignores a key bias

    def forward(self, q, kv, key_mask):
        b, tq, d = q.shape
        split = lambda t: t.view(b, t.shape[1], self.h, d // self.h).transpose(1, 2)
        any_valid = key_mask.any(1, keepdim=True)
        mask = (key_mask | ~any_valid)[:, None, None, :]
        y = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(kv)), split(self.v_proj(kv)), mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, tq, d)) * any_valid[..., None]


class Stream(nn.Module):
    def __init__(self, d, heads, ff, p):
        super().__init__()
        self.cross_attn, self.p = Attention(d, heads), p
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x, ctx, ctx_mask):
        x = self.norm1(x + F.dropout(self.cross_attn(x, ctx, ctx_mask), self.p, self.training))
        ff = F.dropout(self.fc2(F.dropout(F.gelu(self.fc1(x)), self.p, self.training)), self.p, self.training)
        return self.norm2(x + ff)


def masked_mean(x, mask):
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        t, ad, fu, hd = m["tcn"], m["adapter"], m["fusion"], m["head"]
        d, chans = fu["dim"], t["channels"]
        ins = [a["image_dim"]] + chans[:-1]
        self.tcn = nn.ModuleList(Block(i, o, t["kernel_size"], 2 ** l, t["dropout"]) for l, (i, o) in enumerate(zip(ins, chans)))
        self.layer_logits = nn.Parameter(torch.zeros(a["audio_states"]))
        self.projection = nn.Linear(a["audio_hidden"], d)
        self.norm = nn.LayerNorm(d)
        self.down, self.up = nn.Linear(d, ad["bottleneck"]), nn.Linear(ad["bottleneck"], d)
        self.video_in = nn.Linear(chans[-1], d) if chans[-1] != d else None
        self.video = nn.ModuleList(Stream(d, fu["heads"], fu["ff_dim"], fu["dropout"]) for _ in range(fu["layers"]))
        self.audio = nn.ModuleList(Stream(d, fu["heads"], fu["ff_dim"], fu["dropout"]) for _ in range(fu["layers"]))
        self.fc1, self.fc2 = nn.Linear(2 * d, hd["hidden"]), nn.Linear(hd["hidden"], 8)
        self.prompt_projection = nn.Linear(2 * d, a["text_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(2.6592600369327779))
        self.register_buffer("classes", F.normalize(torch.randn(8, a["text_dim"]), dim=-1))
        self.groups = {"tcn": [self.tcn], "adapter": [self.projection, self.norm, self.down, self.up],
                       "fusion": [self.video, self.audio, self.fc1, self.fc2] + ([self.video_in] if self.video_in else []),
                       "prompt": [self.prompt_projection]}

    def align(self, audio_mask, fps, frames):
        # Video frame i takes the mean of the audio frames centred in [i / fps, (i + 1) / fps), else the nearest.
        stride, rf, sr = a["audio_stride"], a["audio_receptive_field"], 16000.0
        t_audio = audio_mask.shape[1]
        centre = (torch.arange(t_audio, device=fps.device) * stride + rf / 2) / sr
        t0 = torch.arange(frames, device=fps.device)[None, :, None] / fps[:, None, None]
        t1 = (torch.arange(frames, device=fps.device)[None, :, None] + 1) / fps[:, None, None]
        inside = (centre >= t0) & (centre < t1) & audio_mask[:, None, :]
        valid = audio_mask.sum(1)
        mid = (t0 + t1)[..., 0] / 2
        nearest = ((mid * sr - rf / 2) / stride).round().long().clamp(min=0)
        nearest = torch.minimum(nearest, (valid - 1).clamp(min=0)[:, None])
        end = ((valid - 1) * stride + rf) / sr
        fallback = F.one_hot(nearest, t_audio).bool() & (mid <= end[:, None])[..., None] & (valid > 0)[:, None, None]
        members = torch.where(inside.any(-1, keepdim=True), inside, fallback)
        weights = members.float() / members.sum(-1, keepdim=True).clamp_min(1)
        return weights, members.any(-1)

    def forward(self, image, face_mask, states, audio_mask, fps):
        b, f, _ = image.shape
        v = (image * face_mask[..., None]).transpose(1, 2)
        for block in self.tcn:
            v = block(v)
        v = v.transpose(1, 2)
        x = (states * self.layer_logits.softmax(0)[None, :, None, None]).sum(1)
        x = self.projection(x)
        x = x + self.up(F.dropout(F.gelu(self.down(self.norm(x))), m["adapter"]["dropout"], self.training))
        weights, a_mask = self.align(audio_mask, fps, f)
        au = weights @ x
        if self.video_in is not None:
            v = self.video_in(v)
        for vs, as_ in zip(self.video, self.audio):
            v, au = vs(v, au, a_mask), as_(au, v, face_mask)
        pooled = torch.cat([masked_mean(v, face_mask), masked_mean(au, a_mask)], -1)
        logits = self.fc2(F.dropout(F.gelu(self.fc1(pooled)), m["head"]["dropout"], self.training))
        scale = self.logit_scale.clamp(max=4.605170185988092).exp()
        prompt = F.normalize(self.prompt_projection(pooled), dim=-1) @ self.classes.T * scale
        return logits, prompt


def main():
    device = torch.device(a.get("device", "cpu"))
    model = Head().train().to(device)
    b, f, t_audio = a["batch"], a["frames"], a["audio_frames"]
    image = torch.randn(b, f, a["image_dim"], device=device)
    face_mask = torch.ones(b, f, dtype=torch.bool, device=device)
    states = torch.randn(b, a["audio_states"], t_audio, a["audio_hidden"], device=device)
    audio_mask = torch.ones(b, t_audio, dtype=torch.bool, device=device)
    fps = torch.full((b,), 25.0, device=device)
    targets = torch.arange(b, device=device) % 8

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.get("bf16", False)):
            logits, prompt = model(image, face_mask, states, audio_mask, fps)
        logits, prompt = logits.float(), prompt.float()
        loss = F.cross_entropy(logits, targets) + m["loss"]["contrastive_weight"] * F.cross_entropy(prompt, targets)
        loss.backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    start = time.perf_counter()
    for _ in range(a["iters"]):
        step()
    sync()
    seconds = time.perf_counter() - start
    count = lambda mods: sum(p.numel() for mod in mods for p in mod.parameters())
    params = {g: count(mods) for g, mods in model.groups.items()}
    params["adapter"] += model.layer_logits.numel()
    params["prompt"] += model.logit_scale.numel()
    print(json.dumps({"figures": {"clips_per_s": b * a["iters"] / seconds}, "params": params, "torch": torch.__version__}))


if __name__ == "__main__":
    configure(json.loads(sys.argv[1]))
    main()

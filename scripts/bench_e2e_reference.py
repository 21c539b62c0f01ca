"""The PyTorch way of training avexpr's job, for scripts/bench-e2e (a benchmark, not part of the product).

Started by `torchrun --nproc-per-node N`: DistributedDataParallel (gloo on CPU), a WebDataset loader over the same
tar shards (`data ingest` with 16-frame segments: one segment is one clip; PIL decodes the face JPEGs in DataLoader
workers), the frozen encoders from transformers, the same trainable head (worker/src/bench_head_reference.py), AdamW.
`extract` then `features`: the ABAW repositories' usual way, per-clip .npy features written once and trained from.
Rank 0 prints one JSON line: seconds per step, data-wait share, peak RSS of every rank (its loader workers included).
"""
import argparse
import glob
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import CLIPModel, Wav2Vec2Model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "worker", "src"))
import bench_head_reference as ref  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["frames", "extract", "features"])
p.add_argument("--shards", required=True, help="the ingest output (shards/train/*.tar)")
p.add_argument("--spec", required=True, help="JSON: the job's encoder directories (clip, wav2vec2) and `model` section")
p.add_argument("--features", help="the .npy directory (extract writes it, features reads it)")
p.add_argument("--micro-batch", type=int, default=8)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--workers", type=int, default=1)
args = p.parse_args()
spec = json.load(open(args.spec))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(args.threads)
FRAMES = 16

clip = CLIPModel.from_pretrained(spec["clip"], dtype=torch.float32).eval().requires_grad_(False)
audio_encoder = Wav2Vec2Model.from_pretrained(spec["wav2vec2"], dtype=torch.float32).eval().requires_grad_(False)
image_pp = json.load(open(os.path.join(spec["clip"], "preprocessor_config.json")))
audio_pp = json.load(open(os.path.join(spec["wav2vec2"], "preprocessor_config.json")))
mean = torch.tensor(image_pp["image_mean"]).view(1, 3, 1, 1)
std = torch.tensor(image_pp["image_std"]).view(1, 3, 1, 1)
ac = audio_encoder.config
stride = math.prod(ac.conv_stride)
receptive_field = 1 + sum((k - 1) * math.prod(ac.conv_stride[:i]) for i, k in enumerate(ac.conv_kernel))
ref.configure({
    "threads": args.threads, "model": spec["model"], "image_dim": clip.config.projection_dim,
    "text_dim": clip.config.projection_dim, "audio_hidden": ac.hidden_size, "audio_states": ac.num_hidden_layers + 1,
    "audio_stride": stride, "audio_receptive_field": receptive_field,
})
torch.set_num_threads(args.threads)


def clip_of(sample):
    """One 16-frame segment of a shard -> (faces uint8 [F, 3, H, W], audio, fps, target, face present [F])."""
    meta = json.loads(sample["json"])
    faces = np.stack([np.asarray(Image.open(io.BytesIO(sample[f"{i:03d}.jpg"])).convert("RGB")) for i in range(FRAMES)])
    audio = np.frombuffer(sample["audio.f32"], dtype=np.float32).copy()
    labels = np.frombuffer(sample["labels.i8"], dtype=np.int8)
    present = np.frombuffer(sample["mask.u8"], dtype=np.uint8) == 0
    return (torch.from_numpy(faces).permute(0, 3, 1, 2), torch.from_numpy(audio), float(meta["fps"]),
            int(labels[-1]), torch.from_numpy(present.copy()), sample["__key__"])


def collate(batch):
    faces, audio, fps, target, present, keys = zip(*batch)
    wave = torch.zeros(len(audio), max(len(a) for a in audio))
    wave_mask = torch.zeros(wave.shape, dtype=torch.bool)
    for i, a in enumerate(audio):
        wave[i, : len(a)], wave_mask[i, : len(a)] = a, True
    return torch.stack(faces), wave, wave_mask, torch.tensor(fps), torch.tensor(target), torch.stack(present), keys


def shards_loader(repeat):
    urls = sorted(glob.glob(os.path.join(args.shards, "shards", "train", "*.tar")))
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if repeat else False, nodesplitter=wds.split_by_node,
                        seed=0, empty_check=False)
    ds = ds.select(lambda s: len(s["labels.i8"]) == FRAMES)
    ds = (ds.shuffle(256) if repeat else ds).map(clip_of)
    if repeat:
        ds = ds.repeat()
    return wds.WebLoader(ds, batch_size=args.micro_batch, num_workers=args.workers, collate_fn=collate)


@torch.no_grad()
def encode(faces, wave, wave_mask):
    """The frozen encoders: CLIP image embeddings per frame, every Wav2Vec 2.0 hidden state, the audio frame mask."""
    b, f = faces.shape[:2]
    x = faces.flatten(0, 1).float() / 255.0
    x = F.interpolate(x, size=(clip.config.vision_config.image_size,) * 2, mode="bicubic", align_corners=False)
    images = clip.get_image_features(pixel_values=(x - mean) / std).pooler_output.view(b, f, -1)
    if audio_pp.get("do_normalize", True):
        n = wave_mask.sum(1, keepdim=True).clamp_min(1)
        mu = (wave * wave_mask).sum(1, keepdim=True) / n
        var = (((wave - mu) * wave_mask) ** 2).sum(1, keepdim=True) / n
        wave = (wave - mu) / (var + 1e-7).sqrt() * wave_mask
    mask = wave_mask.long() if audio_pp.get("return_attention_mask", False) else None
    out = audio_encoder(wave, attention_mask=mask, output_hidden_states=True)
    states = torch.stack(out.hidden_states, 1)
    lengths = audio_encoder._get_feat_extract_output_lengths(wave_mask.sum(1))
    frame_mask = torch.arange(states.shape[2])[None, :] < lengths[:, None]
    return images, states, frame_mask


def peak_rss_mb():
    """VmHWM of this process and of its children (the DataLoader workers), in MiB."""
    def hwm(pid):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0
    me, total = os.getpid(), hwm(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == me:
                total += hwm(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


if args.mode == "extract":
    os.makedirs(args.features, exist_ok=True)
    for faces, wave, wave_mask, fps, target, present, keys in shards_loader(repeat=False):
        images, states, frame_mask = encode(faces, wave, wave_mask)
        for i, key in enumerate(keys):
            valid = int(frame_mask[i].sum())
            np.save(os.path.join(args.features, f"{key}.image.npy"), images[i].numpy())
            np.save(os.path.join(args.features, f"{key}.audio.npy"), states[i, :, :valid].numpy())
            json.dump({"fps": float(fps[i]), "target": int(target[i]), "present": present[i].tolist()},
                      open(os.path.join(args.features, f"{key}.json"), "w"))
    dist.barrier()
    sys.exit(0)


class Features(torch.utils.data.Dataset):
    def __init__(self, root):
        self.root, self.keys = root, sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(root, "*.json")))

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.keys[i])
        meta = json.load(open(path + ".json"))
        return (torch.from_numpy(np.load(path + ".image.npy")), torch.from_numpy(np.load(path + ".audio.npy")),
                meta["fps"], meta["target"], torch.tensor(meta["present"]))


def collate_features(batch):
    images, states, fps, target, present = zip(*batch)
    t = max(s.shape[1] for s in states)
    padded = torch.zeros(len(states), states[0].shape[0], t, states[0].shape[2])
    mask = torch.zeros(len(states), t, dtype=torch.bool)
    for i, s in enumerate(states):
        padded[i, :, : s.shape[1]], mask[i, : s.shape[1]] = s, True
    return torch.stack(images), padded, mask, torch.tensor(fps), torch.tensor(target), torch.stack(present)


def batches():
    if args.mode == "frames":
        for faces, wave, wave_mask, fps, target, present, _ in shards_loader(repeat=True):
            yield (faces, wave, wave_mask), fps, target, present
    else:
        ds = Features(args.features)
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(ds, args.micro_batch, sampler=sampler, num_workers=args.workers,
                                             collate_fn=collate_features, drop_last=True, persistent_workers=True)
        for epoch in range(10**9):
            sampler.set_epoch(epoch)
            for images, states, mask, fps, target, present in loader:
                yield (images, states, mask), fps, target, present


head = ref.Head().train()
model = DDP(head)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
weight = ref.m["loss"]["contrastive_weight"]
data_wait, started, it = 0.0, time.perf_counter(), batches()
for step in range(args.steps):
    t = time.perf_counter()
    inputs, fps, target, present = next(it)
    data_wait += time.perf_counter() - t
    images, states, frame_mask = encode(*inputs) if args.mode == "frames" else inputs
    logits, prompt = model(images, present, states, frame_mask, fps)
    loss = F.cross_entropy(logits, target, ignore_index=-1) + weight * F.cross_entropy(prompt, target, ignore_index=-1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
seconds = time.perf_counter() - started
rss = [None] * world
dist.all_gather_object(rss, peak_rss_mb())
if rank == 0:
    print(json.dumps({"s_per_step": seconds / args.steps, "data_wait_pct": 100 * data_wait / seconds,
                      "clips_per_s": args.micro_batch * world * args.steps / seconds, "peak_rss_mb": rss}))
dist.destroy_process_group()

#!/usr/bin/env python3
"""Is the face signal in a frozen image encoder's embeddings? A diagnostic, not a benchmark.

    python scripts/embedding_probe.py AFFWILD2_ROOT CLIP_DIR [CLIP_DIR ...] [--per-video 60]

For each CLIP checkpoint: the image embedding (transformers' `get_image_features`, the checkpoint's processor) of
up to `--per-video` labelled frames of every training and validation video of an Aff-Wild2-layout dataset
(`cropped_aligned/<video>/<frame>.jpg`, the EXPR annotations), then a linear probe (softmax regression,
class-balanced, Adam 500 steps, the same for every encoder) from a frame's embedding to its expression, trained
on the training frames and scored by macro F1 on the validation frames: on the raw embeddings, as the TCN
receives them, centered (the training frames' mean subtracted), and per dimension standardized with the
training frames' mean and std. Also printed: the
mean cosine between embeddings of different frames and the share of the embeddings' energy in their mean (a
random ViT maps every face close to one direction). Written for the README's question why adapting random
encoders does not recover the face stream.
"""
import argparse
import glob
import os
import random

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("checkpoints", nargs="+")
parser.add_argument("--per-video", type=int, default=60)
args = parser.parse_args()
annotations = os.path.join(args.root, "7th ABAW Annotations", "EXPR_Recognition_Challenge")
random.seed(0)
torch.manual_seed(0)


def frames(split):
    out = []
    for path in sorted(glob.glob(os.path.join(annotations, split, "*.txt"))):
        video = os.path.basename(path)[:-4]
        labels = [int(v) for v in open(path).read().split()[1:] if v.strip()]
        jpg = lambda i: os.path.join(args.root, "cropped_aligned", video, f"{i + 1:05d}.jpg")
        items = [(jpg(i), y) for i, y in enumerate(labels) if y >= 0 and os.path.exists(jpg(i))]
        out += random.sample(items, min(args.per_video, len(items)))
    return out


def macro_f1(pred, y):
    scores = []
    for c in range(8):
        tp, fp, fn = ((pred == c) & (y == c)).sum(), ((pred == c) & (y != c)).sum(), ((pred != c) & (y == c)).sum()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


train, val = frames("Train_Set"), frames("Validation_Set")
for checkpoint in args.checkpoints:
    model = CLIPModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(checkpoint)

    def embed(items):
        out = []
        for i in range(0, len(items), 256):
            images = [Image.open(p).convert("RGB") for p, _ in items[i:i + 256]]
            with torch.no_grad():
                o = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
            out.append(o.pooler_output if hasattr(o, "pooler_output") else o)
        return torch.cat(out).float(), torch.tensor([y for _, y in items])

    xt, yt = embed(train)
    xv, yv = embed(val)
    unit = torch.nn.functional.normalize(xv[:300], dim=1)
    cosine = (unit @ unit.T)[~torch.eye(len(unit), dtype=bool)].mean().item()
    mean_share = (xv.mean(0).norm() ** 2 / (xv ** 2).sum(1).mean()).item()
    counts = torch.bincount(yt, minlength=8).float().clamp(min=1)

    def probe(a, b):
        w = torch.zeros(a.shape[1], 8, requires_grad=True)
        bias = torch.zeros(8, requires_grad=True)
        opt = torch.optim.Adam([w, bias], lr=0.01)
        for _ in range(500):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(a @ w + bias, yt, weight=counts.sum() / counts / 8)
            (loss + 1e-3 * (w ** 2).sum()).backward()
            opt.step()
        return macro_f1((b @ w + bias).argmax(1).numpy(), yv.numpy())

    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    print(f"{checkpoint}: linear probe macro F1 on {len(yv)} validation frames ({len(yt)} training): raw "
          f"{probe(xt, xv):.3f}, centered {probe(xt - mu, xv - mu):.3f}, standardized "
          f"{probe((xt - mu) / sd, (xv - mu) / sd):.3f}; mean cosine between frames {cosine:.3f}; the mean "
          f"embedding's share of the energy {mean_share:.3f}")

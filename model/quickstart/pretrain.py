#!/usr/bin/env python3
"""Pretrains the quickstart's small encoders (a CLIP and a Wav2Vec 2.0 in Hugging Face format) on a synthetic
Aff-Wild2 look-alike, so that, frozen, they carry expression information as the real pretrained encoders do.

    python model/quickstart/pretrain.py --data target/release/data --out model/quickstart

They are NOT CLIP or wav2vec2 weights, and they have never seen Aff-Wild2:
- the look-alike they learn from is `data synth --seed 1001 --videos 64 --min-seconds 4 --max-seconds 8`, a seed
  that no dataset they are evaluated on uses (the quickstart is seed 7; the tests use seeds below 100), so no
  validation video leaks into them; what they learn is what the look-alike's classes look and sound like;
- CLIP (ViT 64 px / 8 px patches, 2 layers of width 64; text tower 2 layers of width 32 with the real CLIP
  vocabulary; 64-d projections) is trained CLIP-style: each face crop (augmented as the training loader does,
  resized and normalised as CLIPImageProcessor does) against the text tower's embeddings of the 8 class
  prompts under 4 templates, with the learnable temperature (the image-to-text term of the CLIP loss, with the
  class prompts as the texts);
- Wav2Vec 2.0 (the base model's conv stack: 50 audio frames per second; 2 transformer layers of width 32) is
  trained on 1 s windows, each audio frame against the voice class sounding at its time, through a linear
  probe that is then thrown away (only `Wav2Vec2Model` is saved). The input is normalised per window as
  Wav2Vec2FeatureExtractor does.
Anger and Disgust look alike and Fear/Surprise, Happiness/Other sound alike in the look-alike, so each encoder
learns 7 (faces) or 6 (voices) distinguishable groups, as a real encoder would not separate what it cannot see
or hear.

Deterministic: fixed seeds, 2 torch threads, no downloads; the same torch on the same CPU remakes the same bytes.
The weights are stored in f16 (as many hub checkpoints are) to keep the committed files small.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from avexpr_classes import CLASS_NAMES  # noqa: E402

SEED = 1001
SYNTH = ["--videos", "64", "--min-seconds", "4", "--max-seconds", "8", "--seed", str(SEED)]
TEMPLATES = ["A face expressing {}", "a photo of a {} face", "a {} expression", "{}"]
IMAGE = 64
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
RATE = 16000


def clip_config():
    from transformers import CLIPConfig
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                dropout=0.0, attention_dropout=0.0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
                  patch_size=8, hidden_act="quick_gelu", dropout=0.0, attention_dropout=0.0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def wav2vec2_config():
    from transformers import Wav2Vec2Config
    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32,) * 7, feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layerdrop=0.0,
                          hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                          mask_time_prob=0.05, mask_time_length=5)


# ---------------------------------------------------------------------------------------------------- data

def read_labels(path):
    with open(path) as f:
        lines = f.read().split("\n")
    return [int(x) for x in lines[1:] if x.strip()]


def fps_of(media):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=r_frame_rate",
                          "-of", "csv=p=0", media], check=True, capture_output=True, text=True).stdout.strip()
    num, den = out.split("/")
    return float(num) / float(den)


def decode_audio(media):
    """16 kHz mono f32, as `data ingest` decodes it (FFmpeg's resampler)."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", media, "-vn", "-ac", "1", "-ar", str(RATE), "-f", "f32le",
                          "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype=np.float32).copy()


def load_lookalike(root, split_sets):
    """Labelled face crops (uint8 [N, 3, 112, 112], labels [N]) and per-voice audio with its frame labels."""
    ann = glob.glob(os.path.join(root, "*ABAW Annotations", "EXPR_Recognition_Challenge"))[0]
    media_of = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(root, "videos", "*", "*"))}
    faces, face_labels, voices = [], [], []
    for split in split_sets:
        for path in sorted(glob.glob(os.path.join(ann, split, "*.txt"))):
            person = os.path.splitext(os.path.basename(path))[0]
            labels = read_labels(path)
            crops = os.path.join(root, "cropped_aligned", person)
            for name in sorted(os.listdir(crops)):
                f = int(name[:-4]) - 1
                if f < len(labels) and labels[f] >= 0:
                    faces.append(np.asarray(Image.open(os.path.join(crops, name)).convert("RGB")).transpose(2, 0, 1))
                    face_labels.append(labels[f])
            if person.endswith("_right"):
                continue  # the voice is the left person's
            base = person[:-5] if person.endswith("_left") else person
            voices.append((decode_audio(media_of[base]), fps_of(media_of[base]), np.array(labels)))
    return torch.from_numpy(np.stack(faces)), torch.tensor(face_labels), voices


# ---------------------------------------------------------------------------------------------------- CLIP

def plain_faces(faces):
    """CLIPImageProcessor's resize (bicubic, antialiased, clipped) of uint8 [N, 3, H, W] faces to 64 px, in
    [0, 1]: what the frozen encoder sees of an unaugmented face before normalisation."""
    out = [F.interpolate(faces[i:i + 512].float(), size=(IMAGE, IMAGE), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 255) / 255.0 for i in range(0, len(faces), 512)]
    return torch.cat(out)


def normalise(x):
    return (x - MEAN) / STD


def augment_faces(x, g):
    """The training loader's augmentation, drawn per image, on [B, 3, 64, 64] faces in [0, 1]: random resized
    crop (area 0.6-1, aspect 3/4-4/3, bilinear), horizontal flip, brightness/contrast/saturation factors in
    [0.7, 1.3] (PIL's ImageEnhance formulas); then normalisation."""
    b = x.shape[0]
    area = 0.6 + 0.4 * torch.rand(b, generator=g)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(b, generator=g))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=g) - 1)
    cy = (1 - h) * (2 * torch.rand(b, generator=g) - 1)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright, contrast, sat = (0.7 + 0.6 * torch.rand(3, b, 1, 1, 1, generator=g))
    x = (x * bright).clamp(0, 1)
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    x = ((x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)).clamp(0, 1)
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    x = ((x - grey) * sat + grey).clamp(0, 1)
    return normalise(x)


def prompt_tokens(tokenizer):
    texts = [t.format(c.lower()) for t in TEMPLATES for c in CLASS_NAMES]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def class_embeddings(model, ids, mask):
    """[templates, 8, dim], L2-normalised."""
    emb = model.get_text_features(input_ids=ids, attention_mask=mask)
    emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
    return F.normalize(emb, dim=-1).view(len(TEMPLATES), len(CLASS_NAMES), -1)


def image_embeddings(model, pixels):
    emb = model.get_image_features(pixel_values=pixels)
    return F.normalize(emb.pooler_output if hasattr(emb, "pooler_output") else emb, dim=-1)


def zero_shot(model, ids, mask, faces, labels):
    """Nearest class prompt ("A face expressing {}") per face: accuracy, and accuracy with Anger = Disgust."""
    model.eval()
    with torch.no_grad():
        text = class_embeddings(model, ids, mask)[0]
        pred = torch.cat([(image_embeddings(model, normalise(faces[i:i + 256])) @ text.T).argmax(-1)
                          for i in range(0, len(faces), 256)])
    merge = torch.tensor([0, 1, 1, 3, 4, 5, 6, 7])
    model.train()
    return (pred == labels).float().mean().item(), (merge[pred] == merge[labels]).float().mean().item()


def pretrain_clip(faces, labels, held_faces, held_labels, tokenizer, steps, log):
    from transformers import CLIPModel
    torch.manual_seed(SEED)
    model = CLIPModel(clip_config()).train()
    ids, mask = prompt_tokens(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(SEED)
    batch = 128
    # Class-balanced draws: the look-alike's rare classes (Fear 1.65 %) would otherwise barely be learned.
    weights = 1.0 / torch.bincount(labels, minlength=len(CLASS_NAMES)).clamp(min=1)[labels].double()
    for step in range(steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        img = image_embeddings(model, augment_faces(faces[idx], g))
        text = class_embeddings(model, ids, mask)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = sum(F.cross_entropy(scale * img @ t.T, labels[idx]) for t in text) / len(TEMPLATES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            acc, merged = zero_shot(model, ids, mask, held_faces, held_labels)
            log(f"clip step {step}: loss {loss.item():.4f}, held-out zero-shot accuracy {acc:.3f} "
                f"({merged:.3f} with Anger = Disgust)")
    return model.eval()


# ---------------------------------------------------------------------------------------------------- Wav2Vec 2.0

def audio_windows(voices, n, seconds, g):
    """n random windows: normalised audio [n, samples] and the class of each 20 ms audio frame [n, frames]."""
    samples = int(seconds * RATE)
    xs, ys = [], []
    for _ in range(n):
        audio, fps, labels = voices[int(torch.randint(0, len(voices), (1,), generator=g))]
        start = int(torch.randint(0, max(1, len(audio) - samples), (1,), generator=g))
        x = torch.from_numpy(audio[start:start + samples])
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        xs.append(x)
        frames = (samples - 400) // 320 + 1
        # An audio frame's receptive field is 400 samples every 320: its centre's video frame gives the class.
        centre = (start + 320 * np.arange(frames) + 200) / RATE
        f = np.minimum((centre * fps).astype(int), len(labels) - 1)
        ys.append(torch.from_numpy(labels[f]))
    return torch.stack(xs), torch.stack(ys).long()


def pretrain_wav2vec2(voices, held_voices, steps, log):
    from transformers import Wav2Vec2Model
    torch.manual_seed(SEED)
    model = Wav2Vec2Model(wav2vec2_config()).train()
    probe = torch.nn.Linear(model.config.hidden_size, len(CLASS_NAMES))
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(SEED)
    held = audio_windows(held_voices, 64, 1.0, torch.Generator().manual_seed(SEED + 1))
    # Class weights (inverse frequency over the voices' labelled frames): the rare classes count as much.
    frame_labels = np.concatenate([v[2] for v in voices])
    counts = torch.bincount(torch.from_numpy(frame_labels[frame_labels >= 0]).long(), minlength=len(CLASS_NAMES))
    counts = counts.double()
    class_weights = (counts.sum() / counts.clamp(min=1) / len(CLASS_NAMES)).float()
    merge = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4])  # Surprise sounds like Fear, Other like Happiness
    for step in range(steps):
        x, y = audio_windows(voices, 16, 1.0, g)
        logits = probe(model(x).last_hidden_state)
        n = min(logits.shape[1], y.shape[1])
        loss = F.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]), y[:, :n].reshape(-1),
                               weight=class_weights, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            model.eval()
            with torch.no_grad():
                hx, hy = held
                pred = probe(model(hx).last_hidden_state).argmax(-1)
                n = min(pred.shape[1], hy.shape[1])
                pred, hy = pred[:, :n], hy[:, :n]
                valid = hy >= 0
                acc = (pred == hy)[valid].float().mean().item()
                merged = (merge[pred] == merge[hy.clamp(min=0)])[valid].float().mean().item()
            model.train()
            log(f"wav2vec2 step {step}: loss {loss.item():.4f}, held-out frame accuracy {acc:.3f} "
                f"({merged:.3f} with Fear = Surprise, Happiness = Other)")
    return model.eval()


# ---------------------------------------------------------------------------------------------------- output

def save_f16(model, out, processor):
    os.makedirs(out, exist_ok=True)
    model.half()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the `data` binary (cargo build --release -p avexpr-data)")
    ap.add_argument("--out", required=True, help="output folder (gets clip/, wav2vec2/, pretrain.json)")
    ap.add_argument("--clip-steps", type=int, default=600)
    ap.add_argument("--wav2vec2-steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import Wav2Vec2FeatureExtractor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "affwild2")
        subprocess.run([args.data, "synth", "--out", root] + SYNTH, check=True, stdout=subprocess.DEVNULL)
        faces, labels, voices = load_lookalike(root, ["Train_Set"])
        held_faces, held_labels, held_voices = load_lookalike(root, ["Validation_Set"])
        faces, held_faces = plain_faces(faces), plain_faces(held_faces)
        sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
        from generate import tokenizer_fixture
        tok_dir = os.path.join(tmp, "tokenizer")
        tokenizer_fixture(tok_dir)
        from transformers import CLIPTokenizerFast
        tokenizer = CLIPTokenizerFast.from_pretrained(tok_dir)
    log(f"look-alike (data synth {' '.join(SYNTH)}): {len(faces)} training faces, {len(voices)} training voices; "
        f"held out (its validation split): {len(held_faces)} faces, {len(held_voices)} voices; "
        f"{time.time() - started:.0f} s")

    t = time.time()
    clip = pretrain_clip(faces, labels, held_faces, held_labels, tokenizer, args.clip_steps, log)
    log(f"CLIP: {args.clip_steps} steps in {time.time() - t:.0f} s")
    t = time.time()
    w2v = pretrain_wav2vec2(voices, held_voices, args.wav2vec2_steps, log)
    log(f"Wav2Vec 2.0: {args.wav2vec2_steps} steps in {time.time() - t:.0f} s")

    clip_dir, w2v_dir = os.path.join(args.out, "clip"), os.path.join(args.out, "wav2vec2")
    for d in (clip_dir, w2v_dir):
        shutil.rmtree(d, ignore_errors=True)
    save_f16(clip, clip_dir, CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                   crop_size={"height": IMAGE, "width": IMAGE}))
    save_f16(w2v, w2v_dir, Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0,
                                                    do_normalize=True, return_attention_mask=False))
    record = {
        "command": "python model/quickstart/pretrain.py --data target/release/data --out model/quickstart",
        "synth": SYNTH,
        "clip_steps": args.clip_steps,
        "wav2vec2_steps": args.wav2vec2_steps,
        "torch": torch.__version__,
        "log": lines,
        "sha256": {os.path.relpath(p, args.out): sha256(p) for p in
                   sorted(glob.glob(os.path.join(args.out, "*", "model.safetensors")))},
        "seconds": round(time.time() - started),
    }
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    log(f"wrote {clip_dir} and {w2v_dir} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

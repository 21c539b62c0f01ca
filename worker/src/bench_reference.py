"""Reference side of `worker bench-encoders`: the same encoders in transformers + PyTorch eager, same threads,
batch, input sizes and iteration counts. Prints one JSON line."""
import json
import sys
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Wav2Vec2Config, Wav2Vec2Model

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
device = torch.device(args["device"])
dtype = torch.bfloat16 if args["bf16"] else torch.float32


def timed(model, inputs, iters):
    with torch.inference_mode():
        model(inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "figures": {}}
if args["clip_iters"] > 0:
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig()).eval().to(device, dtype)
    pixels = torch.randn(args["clip_batch"], 3, 224, 224, device=device, dtype=dtype)
    seconds = timed(clip, pixels, args["clip_iters"])
    result["figures"]["clip_frames_per_s"] = args["clip_batch"] * args["clip_iters"] / seconds
    result["attn_implementation"] = clip.config._attn_implementation
    del clip
if args["audio_iters"] > 0:
    w2v = Wav2Vec2Model(Wav2Vec2Config()).eval().to(device, dtype)
    waves = torch.randn(args["audio_batch"], int(args["audio_seconds"] * 16000), device=device, dtype=dtype)
    seconds = timed(w2v, waves, args["audio_iters"])
    result["figures"]["audio_seconds_per_s"] = args["audio_batch"] * args["audio_seconds"] * args["audio_iters"] / seconds
print(json.dumps(result))

"""The steps of scripts/gpu-check (which sets up and builds, then runs this with the project venv's Python).

Each step runs our binaries as a user does, within a stated time limit, and records what it measured; at the end
one table is printed and every figure is written to <out>/gpu-check.json. The exit status is 1 when a step
failed. With --cpu every step runs on the CPU through the same code paths (the "device" side then means: bf16
where CUDA would use bf16, on the CPU), which is how the test suite exercises this script.

Steps:
  doctor      `orchestrator doctor`: libtorch's CUDA devices (its CUDA backend loaded), the driver's GPUs,
              libnccl; what else doctor finds missing (FFmpeg on a bundle's machine) is listed, not failed.
  embed       `worker embed` of images, the 8 class prompts and audio with bf16 encoders on the device against
              f32 on the CPU, for the fixture checkpoints and the quickstart's pretrained ones: the cosine of
              every embedding vector >= 0.999; the largest absolute difference is stated.
  nccl        `worker nccl-check` under mpirun: 1 rank (2+ when there are 2+ GPUs); on GPUs the NCCL
              all-reduce must be correct, on CPUs the id broadcast.
  train       the quickstart job (dropout off) for --steps steps on the device against the CPU in f32, both
              resumed from the same 1-step checkpoint made on the CPU; the loss curves must track (tolerances
              below).
  encoders    `worker bench-encoders`: frames/s of a random CLIP ViT-B/32 vision tower and audio-s/s of a
              random wav2vec2-base, bf16 on the device, batch 256 (--quick: tiny batches).
  head        `worker bench-head`: the trainable part at the paper's widths (configs/paper.yaml's model section
              as built in), forward + backward under bf16 autocast on the device.
Peak GPU memory: nvidia-smi's memory.used, sampled every 100 ms during each step (device-wide).
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import yaml
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loss-curve tolerances (train step). Both runs start from the same weights, optimizer state and data position
# and see the same batches (dropout off, so no random stream differs between the devices):
# - the first step after the shared checkpoint differs only by bf16 rounding of the same forward pass: bf16 keeps
#   8 bits of mantissa (relative error 2^-9 per rounding), a few dozen roundings deep; 3% of the loss is ample
#   for that and far below what a wrong kernel or a wrong input does (the loss of a random guess is ~2.08);
# - after that the runs diverge as any two numerics do (each update moves the next step's inputs), so the
#   curves are compared as means over quarters of the run: each within 10% of the CPU's mean plus 0.05.
FIRST_STEP_RELATIVE = 0.03
WINDOW_RELATIVE = 0.10
WINDOW_ABSOLUTE = 0.05
COSINE_MIN = 0.999


def log(msg):
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


class GpuMemory:
    """Samples nvidia-smi's memory.used (MiB, largest over the GPUs) every 100 ms; `peak()` since `reset()`."""

    def __init__(self, enabled):
        self.proc, self.value, self.lock = None, None, threading.Lock()
        if not enabled or shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                mib = float(line.strip())
            except ValueError:
                continue
            with self.lock:
                self.value = mib if self.value is None else max(self.value, mib)

    def reset(self):
        with self.lock:
            self.value = None

    def peak(self):
        with self.lock:
            return self.value

    def close(self):
        if self.proc:
            self.proc.kill()


class Check:
    def __init__(self, args):
        self.args = args
        self.bin = os.path.abspath(args.bin)
        self.out = os.path.abspath(args.out)
        self.device = "cpu" if args.cpu else "cuda"
        self.results = []
        self.memory = GpuMemory(not args.cpu)
        self.env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
        if os.geteuid() == 0:
            self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.deadline = None
        self.gpus = 0

    # -- running things ---------------------------------------------------------------------------------------

    def run(self, argv, log_name, env=None, check=True):
        """Runs `argv` within the current step's time; stdout returned, stdout+stderr kept in <out>/logs.
        A non-zero exit raises StepFailed unless `check` is false."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepFailed("out of time before: " + " ".join(argv[:2]))
        path = os.path.join(self.out, "logs", log_name + ".log")
        with open(path, "w") as logf:
            try:
                p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=logf, text=True, timeout=left,
                                   env=dict(self.env, **(env or {})), cwd=ROOT)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"{os.path.basename(argv[0])} {argv[1]} ran past the step's time limit "
                                 f"(log: {path})")
            logf.write(p.stdout)
        if p.returncode != 0 and check:
            tail = open(path).read().strip().splitlines()[-5:]
            raise StepFailed(f"{' '.join(os.path.basename(a) for a in argv[:2])} exited with {p.returncode} "
                             f"(log: {path}): " + " | ".join(tail))
        return p.stdout

    def worker(self, *args):
        return [os.path.join(self.bin, "worker"), *args]

    def mpirun(self, ranks, *args):
        return ["mpirun", "--oversubscribe", "-np", str(ranks), os.path.join(self.bin, "worker"), *args]

    def step(self, name, limit_s, fn):
        log(f"{name} (limit {limit_s} s)")
        self.memory.reset()
        self.deadline = time.monotonic() + limit_s
        start = time.monotonic()
        result = {"step": name, "limit_s": limit_s}
        try:
            summary, figures = fn()
            result.update(status="pass", summary=summary, figures=figures)
        except StepFailed as e:
            result.update(status="FAIL", summary=str(e), figures={})
        except Exception as e:  # a bug of this script must not hide the steps after it
            result.update(status="FAIL", summary=f"{type(e).__name__}: {e}", figures={})
        result["seconds"] = round(time.monotonic() - start, 1)
        peak = self.memory.peak()
        if peak is not None:
            result["peak_gpu_mib"] = peak
        self.results.append(result)
        log(f"{name}: {result['status']} in {result['seconds']} s: {result['summary']}")

    # -- steps ------------------------------------------------------------------------------------------------

    def doctor(self):
        # Doctor exits non-zero when anything a training host needs is missing; this check needs libtorch (with
        # its CUDA backend), the driver and libnccl, not the FFmpeg CLI (a device bundle has no FFmpeg).
        text = self.run([os.path.join(self.bin, "orchestrator"), "doctor"], "doctor", check=False)
        # `name (36 columns) status (20 columns) detail` per line.
        rows = {line[:36].strip(): (line[37:57].strip(), line[57:].strip()) for line in text.splitlines()
                if line.strip()}
        if "libtorch" not in rows:
            raise StepFailed(f"orchestrator doctor printed no libtorch line: {text.strip()[-300:]}")
        lines = {name: detail for name, (_, detail) in rows.items()}
        torch_line = lines["libtorch"]
        m = re.search(r"CUDA devices: (\d+)", torch_line)
        self.gpus = int(m.group(1)) if m else 0
        figures = {"libtorch_cuda_devices": self.gpus, "libtorch": torch_line,
                   "driver": lines.get("CUDA devices (driver)", ""), "libnccl": lines.get("libnccl", ""),
                   "missing": [name for name, (status, _) in rows.items() if status != "ok"]}
        if rows["libtorch"][0] != "ok":
            raise StepFailed(f"libtorch: {torch_line}")
        if not self.args.cpu and self.gpus == 0:
            raise StepFailed(f"libtorch sees no CUDA device ({torch_line}; driver: {figures['driver']})")
        if not self.args.cpu and rows.get("libnccl", ("",))[0] != "ok":
            raise StepFailed(f"libnccl: {figures['libnccl']}")
        missing = f"; missing here: {', '.join(figures['missing'])}" if figures["missing"] else ""
        return f"{self.gpus} CUDA device(s) [{figures['driver']}]; libnccl {figures['libnccl']}{missing}", figures

    def embed(self):
        inputs = os.path.join(self.out, "inputs")
        os.makedirs(inputs, exist_ok=True)
        wav = os.path.join(inputs, "speech-like.wav")
        write_speech_like(wav, seconds=2.0)
        fixtures = os.path.join(ROOT, "model", "tests", "fixtures")
        images = [os.path.join(fixtures, f"image{i}.png") for i in range(3)]
        # The tiny fixture CLIP needs the real tokenizer beside it, as the quickstart's has it.
        qs_clip, qs_w2v = (os.path.join(self.args.quickstart, "encoders", n) for n in ("clip", "wav2vec2"))
        tiny_clip = os.path.join(inputs, "clip-tiny")
        shutil.rmtree(tiny_clip, ignore_errors=True)
        shutil.copytree(os.path.join(fixtures, "clip-tiny"), tiny_clip)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(qs_clip, name), tiny_clip)
        pairs = {"fixture": (tiny_clip, os.path.join(fixtures, "wav2vec2-tiny-group")), "quickstart": (qs_clip, qs_w2v)}
        figures, worst = {}, (1.0, "")
        for label, (clip, w2v) in pairs.items():
            outputs = {}
            for side, device, precision in (("device", self.device, "bf16"), ("cpu", "cpu", "f32")):
                path = os.path.join(self.out, f"embed-{label}-{side}.safetensors")
                self.run(self.worker("embed", "--device", device, "--precision", precision, "--clip", clip,
                                     "--wav2vec2", w2v, "--images", *images, "--audio", wav, "--out", path),
                         f"embed-{label}-{side}")
                outputs[side] = load_file(path)
            for name in sorted(outputs["cpu"]):
                a, b = outputs["device"][name].astype(np.float64), outputs["cpu"][name].astype(np.float64)
                if a.shape != b.shape:
                    raise StepFailed(f"{label} {name}: shape {a.shape} on the device, {b.shape} on the CPU")
                a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
                cos = (a2 * b2).sum(1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-30)
                key = f"{label}.{name}"
                figures[key] = {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max()),
                                "max_abs": float(np.abs(b).max()), "vectors": int(a2.shape[0])}
                if cos.min() < worst[0]:
                    worst = (float(cos.min()), key)
        bad = [k for k, f in figures.items() if f["min_cosine"] < COSINE_MIN]
        summary = (f"{len(figures)} tensors, {sum(f['vectors'] for f in figures.values())} vectors: lowest cosine "
                   f"{worst[0]:.6f} ({worst[1]}), largest |diff| "
                   f"{max(f['max_abs_diff'] for f in figures.values()):.3g}")
        if bad:
            raise StepFailed(f"cosine below {COSINE_MIN} in {', '.join(bad)}; {summary}")
        return summary, figures

    def nccl(self):
        ranks = [1] + ([self.gpus] if self.gpus >= 2 else []) if not self.args.cpu else [2]
        figures = {}
        for n in ranks:
            text = self.run(self.mpirun(n, "nccl-check"), f"nccl-check-{n}")
            figures[f"{n}_ranks"] = text.strip()
            if f"reached all {n} ranks" not in text:
                raise StepFailed(f"{n} rank(s): the unique id did not reach every rank: {text.strip()}")
            if not self.args.cpu and "NCCL all-reduce (average)" not in text:
                raise StepFailed(f"{n} rank(s): no NCCL all-reduce on the device: {text.strip()}")
        what = "id broadcast (CPU: no all-reduce)" if self.args.cpu else "communicator + all-reduce correct"
        return f"{', '.join(f'{n} rank(s)' for n in ranks)}: {what}", figures

    def train(self):
        steps = self.args.steps
        if not self.args.cpu and self.gpus == 0:
            raise StepFailed("no CUDA device: the device side would run on the CPU")
        base = yaml.safe_load(open(os.path.join(ROOT, "configs", "quickstart.yaml")))
        qs = self.args.quickstart

        def config(name, total, mixed_precision):
            job = json.loads(json.dumps(base))
            run_dir = os.path.join(self.out, name)
            job["run_dir"] = run_dir
            job["data"]["shards"] = os.path.join(qs, "shards")
            job["model"]["clip"]["checkpoint"] = os.path.join(qs, "encoders", "clip")
            job["model"]["wav2vec2"]["checkpoint"] = os.path.join(qs, "encoders", "wav2vec2")
            for section in ("tcn", "adapter", "fusion", "head"):
                job["model"][section]["dropout"] = 0.0
            job["train"].update(steps=total, log_every=1, eval_every=0, eval_at_end=False, tensorboard=False,
                                mixed_precision=mixed_precision, warmup_steps=max(1, min(20, steps // 4)))
            job["checkpoint"] = {"uri": os.path.join(run_dir, "checkpoints"), "every": 100000, "keep_last_k": 1}
            path = os.path.join(self.out, name + ".yaml")
            with open(path, "w") as f:
                yaml.safe_dump(job, f, sort_keys=False)
            return path, run_dir

        # The shared start: one step on the CPU, its checkpoint copied into both runs.
        init_cfg, init_dir = config("train-init", 1, "off")
        shutil.rmtree(init_dir, ignore_errors=True)
        self.run(self.worker("train", "--config", init_cfg), "train-init", env={"CUDA_VISIBLE_DEVICES": ""})
        # The device side: bf16 encoders and autocast on CUDA; with --cpu, bf16 autocast on the CPU.
        sides = {"cpu": ("off", {"CUDA_VISIBLE_DEVICES": ""}),
                 "device": ("bf16" if self.args.cpu else "auto", {})}
        losses, seconds = {}, {}
        for side, (mp, env) in sides.items():
            cfg, run_dir = config(f"train-{side}", steps, mp)
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(os.path.join(init_dir, "checkpoints"), os.path.join(run_dir, "checkpoints"))
            t = time.monotonic()
            self.run(self.worker("train", "--config", cfg), f"train-{side}", env=env)
            seconds[side] = time.monotonic() - t
            rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
            losses[side] = {r["step"]: r["loss"] for r in rows if r["step"] > 1}
        if sorted(losses["cpu"]) != list(range(2, steps + 1)) or sorted(losses["device"]) != sorted(losses["cpu"]):
            raise StepFailed(f"logged steps differ: cpu {sorted(losses['cpu'])[:3]}..., device "
                             f"{sorted(losses['device'])[:3]}...")
        order = sorted(losses["cpu"])
        cpu = np.array([losses["cpu"][s] for s in order])
        dev = np.array([losses["device"][s] for s in order])
        first = abs(dev[0] - cpu[0]) / cpu[0]
        quarters = [q for q in np.array_split(np.arange(len(order)), 4) if len(q)]
        windows = []
        for q in quarters:
            c, d = float(cpu[q].mean()), float(dev[q].mean())
            windows.append({"steps": [order[q[0]], order[q[-1]]], "cpu": c, "device": d,
                            "ok": abs(d - c) <= WINDOW_RELATIVE * c + WINDOW_ABSOLUTE})
        figures = {"steps": steps, "first_step": {"step": order[0], "cpu": float(cpu[0]), "device": float(dev[0]),
                                                   "relative_diff": float(first)},
                   "windows": windows, "identical": bool((cpu == dev).all()),
                   "seconds": {k: round(v, 1) for k, v in seconds.items()},
                   "device_steps_per_s": round((steps - 1) / seconds["device"], 2),
                   "cpu_steps_per_s": round((steps - 1) / seconds["cpu"], 2),
                   "tolerance": {"first_step_relative": FIRST_STEP_RELATIVE, "window_relative": WINDOW_RELATIVE,
                                 "window_absolute": WINDOW_ABSOLUTE}}
        summary = (f"step {order[0]} loss {dev[0]:.4f} vs {cpu[0]:.4f} (rel {first:.2e}); quarter means "
                   + ", ".join(f"{w['device']:.3f}/{w['cpu']:.3f}" for w in windows)
                   + f"; {figures['device_steps_per_s']} vs {figures['cpu_steps_per_s']} steps/s")
        if first > FIRST_STEP_RELATIVE or not all(w["ok"] for w in windows):
            raise StepFailed("the loss curves part: " + summary)
        return summary, figures

    def encoders(self):
        q = self.args.quick
        path = os.path.join(self.out, "bench-encoders.json")
        self.run(self.worker("bench-encoders", "--device", self.device, "--precision", "bf16", "--no-reference",
                             "--rounds", "1", "--clip-batch", "2" if q else "256", "--clip-iters", "1" if q else "10",
                             "--audio-batch", "1" if q else "8", "--audio-seconds", "1" if q else "10",
                             "--audio-iters", "1" if q else "5", "--json", path), "bench-encoders")
        ours = json.load(open(path))["ours"]
        return (f"CLIP ViT-B/32 {ours['clip_frames_per_s']:.0f} frames/s, wav2vec2-base "
                f"{ours['audio_seconds_per_s']:.0f} audio-s/s (bf16)"), ours

    def head(self):
        q = self.args.quick
        path = os.path.join(self.out, "bench-head.json")
        batch = "2" if q else "32"
        self.run(self.worker("bench-head", "--device", self.device, "--no-reference", "--rounds", "1",
                             "--batch", batch, "--iters", "1" if q else "20", "--json", path), "bench-head")
        clips = json.load(open(path))["ours"]["clips_per_s"]
        return (f"{1e3 * int(batch) / clips:.1f} ms per forward+backward of {batch} clips x 16 frames "
                f"({clips:.0f} clips/s)"), {"clips_per_s": clips, "batch": int(batch), "frames": 16,
                                            "ms_per_step": 1e3 * int(batch) / clips}

    # -- report -----------------------------------------------------------------------------------------------

    def report(self, started):
        width = max(len(r["step"]) for r in self.results)
        lines = [f"gpu-check ({'CPU only' if self.args.cpu else 'CUDA'}), {time.strftime('%Y-%m-%d %H:%M')}, "
                 f"{time.monotonic() - started:.0f} s", ""]
        lines.append(f"{'step':<{width}}  {'result':<6} {'s':>6} {'limit':>6} {'GPU MiB':>8}  what was measured")
        for r in self.results:
            mib = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
            lines.append(f"{r['step']:<{width}}  {r['status']:<6} {r['seconds']:>6.1f} {r['limit_s']:>6} {mib:>8}  "
                         f"{r['summary']}")
        peaks = [r["peak_gpu_mib"] for r in self.results if "peak_gpu_mib" in r]
        lines.append("")
        lines.append(f"peak GPU memory (nvidia-smi memory.used, device-wide): "
                     f"{f'{max(peaks):.0f} MiB' if peaks else 'not measured (no GPU)'}")
        text = "\n".join(lines) + "\n"
        doc = {"mode": "cpu" if self.args.cpu else "cuda", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "seconds": round(time.monotonic() - started, 1), "steps": self.results,
               "peak_gpu_mib": max(peaks) if peaks else None, "table": text}
        with open(os.path.join(self.out, "gpu-check.json"), "w") as f:
            json.dump(doc, f, indent=2)
        return text


class StepFailed(Exception):
    pass


def write_speech_like(path, seconds, rate=16000):
    """A voiced, pitch-gliding signal with formant-like partials and noise bursts (not silence, not one tone)."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * math.pi * 1.5 * t)
    phase = 2 * math.pi * np.cumsum(f0) / rate
    x = sum(a * np.sin(k * phase) for k, a in ((1, 1.0), (2, 0.6), (3, 0.4), (5, 0.25), (8, 0.1)))
    x *= 0.5 + 0.5 * np.sin(2 * math.pi * 3 * t) ** 2
    x += 0.05 * np.random.default_rng(0).standard_normal(t.shape)
    pcm = np.clip(x / np.abs(x).max() * 0.6 * 32767, -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="folder of the worker and orchestrator binaries")
    p.add_argument("--cpu", action="store_true", help="every step on the CPU (same code paths)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's run)")
    p.add_argument("--steps", type=int, default=200, help="training steps of the loss-curve comparison")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"))
    p.add_argument("--quickstart", default=os.path.join(ROOT, "runs", "quickstart"),
                   help="the quickstart assets (scripts/quickstart-assets)")
    args = p.parse_args()
    if args.steps < 5:
        p.error("--steps must be at least 5 (the curve is compared in quarters)")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    check = Check(args)
    started = time.monotonic()
    # Time limits: what each step needs on one H100/H200 once built, with margin; 8 minutes together.
    check.step("doctor", 30, check.doctor)
    check.step("embed", 60, check.embed)
    check.step("nccl", 45, check.nccl)
    check.step("train", 195, check.train)
    check.step("encoders", 75, check.encoders)
    check.step("head", 60, check.head)
    check.memory.close()
    print(check.report(started), end="")
    print(f"written: {os.path.join(args.out, 'gpu-check.json')}", file=sys.stderr)
    sys.exit(0 if all(r["status"] == "pass" for r in check.results) else 1)


if __name__ == "__main__":
    main()

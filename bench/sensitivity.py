"""Sensitivity pass: pkt vs a plain forward+backward (the floor) vs a reference-style pass.

Each mode runs in its own process (so peak memory is its own): resident set on CPU, CUDA max
allocated on a GPU. Printed side by side: tokens/s, peak memory, a/b and peak(a)/peak(c), and
whether pkt's map equals the reference's.

    python bench/sensitivity.py                      # ~50M-param synthetic Llama, CPU
    python bench/sensitivity.py --hidden 2048 --layers 16 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq * 2)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(args.samples):
        ids = torch.randint(0, args.vocab, (1, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 2] = -100  # answer tokens: the second half
        samples.append({"input_ids": ids.to(args.device), "labels": labels.to(args.device)})
    return model, samples


def mode_pkt(model, samples):
    from pkt.core.sensitivity import compute_sensitivity

    return compute_sensitivity(model, samples, progress=False)


def mode_floor(model, samples):
    for s in samples:
        model(**s).loss.backward()
        model.zero_grad(set_to_none=True)
    return None


def mode_reference(model, samples):
    """As the reference implementation does it: keep each sample's full gradient dict, then
    build |theta * grad| as a second full dict, then add it into the running sum."""
    total = None
    for s in samples:
        model.zero_grad(set_to_none=True)
        model(**s).loss.backward()
        grads = {n: p.grad.detach().clone().float() for n, p in model.named_parameters()}
        scores = {n: (p.detach().float() * grads[n]).abs() for n, p in model.named_parameters()}
        total = scores if total is None else {n: total[n] + scores[n] for n in total}
        del grads, scores
    model.zero_grad(set_to_none=True)
    return total


MODES = {"pkt": mode_pkt, "floor": mode_floor, "reference": mode_reference}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set every few ms while the pass runs (ru_maxrss would include model set-up)."""

    def __enter__(self):
        import threading

        self.start, self.peak, self._stop = rss_bytes(), rss_bytes(), False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def child(args) -> None:
    from safetensors.torch import save_file

    model, samples = build(args)
    fn = MODES[args.mode]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn(model, samples)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    if out is not None and args.save:
        save_file({k: v.float().cpu().contiguous() for k, v in out.items()}, args.save)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mode": args.mode, "seconds": seconds, "peak_bytes": peak, "extra_bytes": peak - base,
                      "params": params,
                      "tokens": args.samples * args.seq}))


def run_mode(mode: str, args, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--samples", str(args.samples), "--device", args.device,
           "--dtype", args.dtype] + (["--save", save] if save else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-reference", action="store_true", help="big models: the reference may not fit")
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        a = run_mode("pkt", args, os.path.join(tmp, "a.safetensors"))
        b = run_mode("floor", args, None)
        rows = [a, b]
        if not args.skip_reference:
            c = run_mode("reference", args, os.path.join(tmp, "c.safetensors"))
            rows.append(c)
            sa, sc = load_file(os.path.join(tmp, "a.safetensors")), load_file(os.path.join(tmp, "c.safetensors"))
            tol = 1e-5 if args.dtype == "float32" else 1e-2
            same = all(torch.allclose(sa[k], sc[k], rtol=tol, atol=1e-8) for k in sa)
    print(f"synthetic Llama: {a['params'] / 1e6:.1f}M params, {args.samples} samples x {args.seq} tokens, "
          f"{args.device}, {args.dtype}")
    for r in rows:
        print(f"  {r['mode']:9s} {r['tokens'] / r['seconds']:10.0f} tokens/s   peak {r['peak_bytes'] / 2**20:9.0f} MiB"
              f"   above the loaded model and samples {r['extra_bytes'] / 2**20:8.0f} MiB")
    print(f"a/b (pkt time / floor time) = {a['seconds'] / b['seconds']:.2f}   (target <= 1.5)")
    if not args.skip_reference:
        print(f"peak(a)/peak(c) (pkt / reference), whole process = {a['peak_bytes'] / c['peak_bytes']:.2f}")
        print(f"peak(a)/peak(c) (pkt / reference), above the loaded model = "
              f"{a['extra_bytes'] / c['extra_bytes']:.2f}   (target <= 0.5)")
        print(f"pkt map equals reference map: {same}")


if __name__ == "__main__":
    main()

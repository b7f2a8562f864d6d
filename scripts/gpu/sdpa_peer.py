#!/usr/bin/env python3
"""The peer column of a GPU measurement (scripts/gpu/measure): PyTorch scaled_dot_product_attention
on the same shapes and the same GPU as the attnbench rows given, plus the GPU's rooflines.

For every `attnbench bench --json` file given, each row run on an OpenCL GPU device is matched by
shape and storage with SDPA on CUDA (fp32 rows: fp32 SDPA with TF32 off; rows with fp16 storage:
fp16 SDPA), and the table shows GFLOP/s as a fraction of the GPU's fp32 peak (SMs x FP32 lanes x 2 x
max clock, from nvidia-smi) and of fp32 GEMM measured now, decode K/V GB/s as a fraction of read
bandwidth measured now, and attnbench / SDPA. Needs torch with CUDA; says so and exits 0 without.
Usage: sdpa_peer.py [--json out.json] bench.json ...
"""
import argparse, json, re, subprocess, sys, time

SUMMARY = re.compile(r"B(\d+) H(\d+)(?:/(\d+))? (?:N(\d+)|Nq(\d+) Nk(\d+)) D(\d+)(?: Dv(\d+))?( causal)?$")
# FP32 lanes per SM by compute capability (NVIDIA's tuning guides).
LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128,
         (12, 0): 128}


def parse(summary):
    m = SUMMARY.match(summary.strip())
    if not m:
        return None
    b, hq, hkv, n, nq, nk, d, dv, causal = m.groups()
    nq = int(n or nq); nk = int(n or nk)
    return dict(B=int(b), Hq=int(hq), Hkv=int(hkv or hq), Nq=nq, Nk=nk, D=int(d), Dv=int(dv or d),
                causal=bool(causal))


def median_time(torch, fn, min_time=0.3, min_iters=5):
    fn(); torch.cuda.synchronize()
    times, end = [], time.perf_counter() + min_time
    while len(times) < min_iters or time.perf_counter() < end:
        start = torch.cuda.Event(enable_timing=True); stop = torch.cuda.Event(enable_timing=True)
        start.record(); fn(); stop.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
        if len(times) >= 100:
            break
    times.sort()
    return times[len(times) // 2]


def rooflines(torch):
    props = torch.cuda.get_device_properties(0)
    lanes = LANES.get((props.major, props.minor), 128)
    clock_mhz = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        clock_mhz = float(out[0]) if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    peak = props.multi_processor_count * lanes * 2 * clock_mhz * 1e6 / 1e9 if clock_mhz else None
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
    gemm = 2 * 8192 ** 3 / median_time(torch, lambda: a @ b) / 1e9
    x = torch.empty(1 << 28, device="cuda")  # 1 GiB
    read = x.numel() * 4 / median_time(torch, lambda: x.sum()) / 1e9
    return dict(name=props.name, sms=props.multi_processor_count, fp32_lanes_per_sm=lanes, max_clock_mhz=clock_mhz,
                fp32_peak_gflops=peak, fp32_gemm_gflops=gemm, read_gbps=read)


def sdpa_seconds(torch, F, s, half):
    dtype = torch.float16 if half else torch.float32
    q = torch.randn(s["B"], s["Hq"], s["Nq"], s["D"], device="cuda", dtype=dtype)
    k = torch.randn(s["B"], s["Hkv"], s["Nk"], s["D"], device="cuda", dtype=dtype)
    v = torch.randn(s["B"], s["Hkv"], s["Nk"], s["Dv"], device="cuda", dtype=dtype)
    gqa = s["Hq"] != s["Hkv"]
    # Bottom-right causal as AttentionKit's contract: SDPA's is_causal is top-left, equal when Nq == Nk.
    causal = s["causal"] and s["Nq"] == s["Nk"]
    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return median_time(torch, call)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench", nargs="+"); ap.add_argument("--json")
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("sdpa_peer: no torch here: the PyTorch peer is skipped"); return 0
    if not torch.cuda.is_available():
        print("sdpa_peer: torch sees no CUDA device: the PyTorch peer is skipped"); return 0
    roof = rooflines(torch)
    print(f"{roof['name']}: {roof['sms']} SMs x {roof['fp32_lanes_per_sm']} FP32 lanes at {roof['max_clock_mhz']} MHz"
          f" = {roof['fp32_peak_gflops'] or float('nan'):.0f} GFLOP/s fp32 peak; fp32 GEMM (TF32 off) "
          f"{roof['fp32_gemm_gflops']:.0f} GFLOP/s and read {roof['read_gbps']:.0f} GB/s measured now")
    rows, cache = [], {}
    for path in args.bench:
        with open(path) as f:
            data = json.load(f)
        for row in data if isinstance(data, list) else data.get("results", []):
            s = parse(row.get("shape_summary", ""))
            if s is None or not row.get("median_seconds") or "opencl" not in row.get("backend", ""):
                continue
            half = "f16" in row.get("storage", "")
            key = (row["shape_summary"], half)
            if key not in cache:
                try:
                    cache[key] = sdpa_seconds(torch, F, s, half)
                except RuntimeError as error:  # out of memory, unsupported combination
                    cache[key] = None
                    print(f"sdpa_peer: {row['shape']} ({'fp16' if half else 'fp32'}): {error}")
            peer = cache[key]
            mine = row["median_seconds"]
            gflops = row.get("gflops") or 0
            entry = dict(shape=row["shape"], storage=row.get("storage"), backend=row.get("backend_name", row["backend"]),
                         device=row.get("device"), kernel=row.get("kernel"), seconds=mine, gflops=gflops,
                         peak_fraction=gflops / roof["fp32_peak_gflops"] if roof["fp32_peak_gflops"] else None,
                         gemm_fraction=gflops / roof["fp32_gemm_gflops"],
                         kv_gbps=row.get("key_value_g_bps"),
                         bandwidth_fraction=(row["key_value_g_bps"] / roof["read_gbps"]) if row.get("key_value_g_bps") else None,
                         sdpa_seconds=peer, vs_sdpa=(peer / mine) if peer else None)
            rows.append(entry)
            def fmt(x, spec):
                return format(x, spec) if x is not None else "-"
            print(f"{entry['shape']:<16} {str(entry['storage']):<22} {entry['backend']:<10} {mine * 1e3:9.3f} ms "
                  f"{gflops:8.0f} GFLOP/s = {fmt(entry['peak_fraction'], '.2f')} x peak, "
                  f"{fmt(entry['gemm_fraction'], '.2f')} x GEMM; K/V {fmt(entry['bandwidth_fraction'], '.2f')} x read bw; "
                  f"SDPA {fmt(peer and peer * 1e3, '.3f')} ms, attnbench/SDPA speed {fmt(entry['vs_sdpa'], '.2f')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rooflines=roof, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

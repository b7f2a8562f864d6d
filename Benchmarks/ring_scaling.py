#!/usr/bin/env python3
"""A scaling table on paper for ring attention (zig-zag sharding, causal) on P ranks.

Usage: python3 Benchmarks/ring_scaling.py --gflops R [--bandwidth-gbit 100] [--latency-us 5]
                                           [--hq 8 --hkv 8 --d 64 --dv 64 --kv-bytes 4]

R is one rank's attention rate in GFLOP/s, measured: `attnbench ring` prints each rank's compute time
for a known problem (FLOPs 2·B·Hq·N²·(D+Dv), halved for causal, split over the ranks). Per ring step a
rank computes N²/(2P²) visible query-key pairs (zig-zag: every step sees half of a (N/P)² block on
average) and sends one K/V shard of (N/P)·Hkv·(D+Dv)·bytes, which the next step's compute hides when
compute time >= transfer time. Without latency that holds from N* = P · (Hkv/Hq) · bytes · R / BW on
(independent of D); the table solves compute = transfer + latency for N*.
"""
import argparse


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--gflops", type=float, required=True, help="one rank's measured attention GFLOP/s")
    a.add_argument("--bandwidth-gbit", type=float, default=100.0, help="network bandwidth per link, Gbit/s")
    a.add_argument("--latency-us", type=float, default=5.0, help="per-message latency, µs")
    a.add_argument("--hq", type=int, default=8)
    a.add_argument("--hkv", type=int, default=8)
    a.add_argument("--d", type=int, default=64)
    a.add_argument("--dv", type=int, default=64)
    a.add_argument("--kv-bytes", type=int, default=4, help="4 for fp32 K/V, 2 for fp16/bf16")
    x = a.parse_args()
    rate = x.gflops * 1e9
    bw = x.bandwidth_gbit * 1e9 / 8
    print(f"one rank: {x.gflops:.0f} GFLOP/s; link {x.bandwidth_gbit:.0f} Gbit/s ({bw / 1e9:.1f} GB/s), "
          f"{x.latency_us:.0f} µs latency; Hq {x.hq}, Hkv {x.hkv}, D {x.d}, Dv {x.dv}, K/V {x.kv_bytes} B")
    print()
    print("ranks  N (tokens)  compute/step ms  transfer/step ms  bound     step efficiency")
    for p in (8, 16, 32, 64):
        # compute(N) = transfer(N): a·N² = b·N + latency.
        a_ = x.hq * (x.d + x.dv) / (p * p * rate)
        b_ = x.hkv * (x.d + x.dv) * x.kv_bytes / (p * bw)
        n_star = (b_ + (b_ * b_ + 4 * a_ * x.latency_us * 1e-6) ** 0.5) / (2 * a_)
        for n in (8192, 32768, 131072, 524288, 1048576):
            if n < p:
                continue
            pairs = n * n / (2 * p * p)
            compute = pairs * 2 * x.hq * (x.d + x.dv) / rate
            transfer = (n / p) * x.hkv * (x.d + x.dv) * x.kv_bytes / bw + x.latency_us * 1e-6
            bound = "compute" if compute >= transfer else "network"
            efficiency = compute / max(compute, transfer)
            print(f"{p:5d}  {n:10d}  {compute * 1e3:15.3f}  {transfer * 1e3:16.3f}  {bound:8s}  {efficiency:6.0%}")
        print(f"{p:5d}  compute-bound from N* = {n_star:,.0f} tokens")
    print()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End-to-end check of `attnbench ring`: context-parallel and sharded-K/V attention across ranks.

Usage: python3 scripts/ring_check.py PATH/TO/attnbench [--mpi]

Writes inputs with NumPy and runs `attnbench ring` on 2 and 3 ranks (with --mpi: `mpirun -np N`,
with --oversubscribe, and --allow-run-as-root only when root; otherwise ranks as threads, --ranks N).
O and LSE are compared with an independent NumPy float64 implementation (scripts/cli_check.py's) within
the fp32 tolerance: causal and not, GQA, MQA, windows, fp16/bf16 K/V, lengths not divisible by the rank
count, a rank with an empty shard, both shardings, packed sequences (--cu-seqlens), decode against a
sharded cache. Then a rank that fails (killed under MPI; an error in-process; the root and the last
rank) and a bad input file must make the run exit non-zero, with the reason, within a time bound (a run
past it is killed with its ranks). Prints 'N passed, N failed' and exits non-zero on failure.
"""
import os
import signal
import subprocess
import sys
import tempfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_check import ATOL, RTOL, reference  # noqa: E402

TIMEOUT = 180


def bf16(x):
    """Round float32 to bfloat16 (nearest even) and back."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def seed(name):
    """The same inputs on every run (Python's hash() of a str changes from process to process)."""
    return zlib.crc32(name.encode())


class RingChecker:
    def __init__(self, exe, mpi, tmp):
        self.exe, self.mpi, self.tmp = exe, mpi, tmp
        self.passed = self.failed = 0

    def path(self, name):
        return os.path.join(self.tmp, name)

    def command(self, ranks, args):
        if not self.mpi:
            return [self.exe, "ring", "--ranks", str(ranks), *args]
        launcher = ["mpirun", "--oversubscribe", "-np", str(ranks)]
        if os.geteuid() == 0:
            launcher.append("--allow-run-as-root")
        return [*launcher, self.exe, "ring", *args]

    def run(self, ranks, args):
        """The finished run, or None past TIMEOUT; then mpirun and every rank it started are killed (their own
        process group), so a hung run leaves nothing behind."""
        process = subprocess.Popen(self.command(ranks, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail}", file=sys.stderr)

    def case(self, name, b, hq, hkv, nq, nk, d, dv, causal=False, window=None, kv="f32", softcap=None,
             ranks=(2, 3), shardings=("zigzag", "contiguous")):
        rng = np.random.default_rng(seed(name))
        q = rng.uniform(-2, 2, (b, hq, nq, d)).astype(np.float32)
        k = rng.uniform(-2, 2, (b, hkv, nk, d)).astype(np.float32)
        v = rng.uniform(-1, 1, (b, hkv, nk, dv)).astype(np.float32)
        for f, x in (("q", q), ("k", k), ("v", v)):
            np.save(self.path(f"{name}-{f}.npy"), x)
        rk, rv = k, v
        if kv == "f16":
            rk, rv = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
        elif kv == "bf16":
            rk, rv = bf16(k), bf16(v)
        ref_o, ref_lse = reference(q, rk, rv, causal=causal, window=window, softcap=softcap)
        base = ["--q", self.path(f"{name}-q.npy"), "--k", self.path(f"{name}-k.npy"), "--v",
                self.path(f"{name}-v.npy"), "--kv-dtype", kv, "--out", self.path(f"{name}-o.npy"), "--lse",
                self.path(f"{name}-lse.npy")]
        if causal:
            base.append("--causal")
        if window is not None:
            base.append(f"--window={window[0]},{window[1]}")
        if softcap is not None:
            base += ["--softcap", str(softcap)]
        for n in ranks:
            for sharding in (shardings if nq == nk else ("zigzag",)):
                label = f"{name} ({n} ranks, {sharding})"
                result = self.run(n, [*base, "--sharding", sharding])
                if result is None:
                    self.check(label, False, f"no result within {TIMEOUT} s")
                    continue
                if result.returncode != 0:
                    self.check(label, False, f"exit {result.returncode}: {result.stderr[-800:]}")
                    continue
                o = np.load(self.path(f"{name}-o.npy"))
                lse = np.load(self.path(f"{name}-lse.npy"))
                o_err = np.abs(o - ref_o)
                o_ok = bool(np.all(o_err <= ATOL + RTOL * np.abs(ref_o)))
                finite = np.isfinite(ref_lse)
                lse_ok = bool(np.all(lse[~finite] == ref_lse[~finite])) and bool(
                    np.all(np.abs(lse[finite] - ref_lse[finite]) <= ATOL + RTOL * np.abs(ref_lse[finite])))
                report = result.stdout
                timings_ok = "hidden" in report and f"ring: {n} ranks" in report
                self.check(label, o_ok and lse_ok and timings_ok,
                           f"max |O error| {o_err.max():.3g}, LSE ok {lse_ok}, report:\n{report}")

    def packed(self, name, lengths, hq, hkv, d, dv, causal=True, kv="f32", ranks=(2, 3)):
        """Packed sequences (--cu-seqlens): each sequence its own problem, against NumPy per sequence."""
        rng = np.random.default_rng(seed(name))
        total = sum(lengths)
        q = rng.uniform(-2, 2, (total, hq, d)).astype(np.float32)
        k = rng.uniform(-2, 2, (total, hkv, d)).astype(np.float32)
        v = rng.uniform(-1, 1, (total, hkv, dv)).astype(np.float32)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        for f, x in (("q", q), ("k", k), ("v", v), ("cu", cu)):
            np.save(self.path(f"{name}-{f}.npy"), x)
        rk, rv = (k, v) if kv == "f32" else (k.astype(np.float16).astype(np.float32),
                                             v.astype(np.float16).astype(np.float32))
        ref_o = np.zeros((total, hq, dv))
        ref_lse = np.full((total, hq), -np.inf)
        for s, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
            if hi == lo:
                continue
            per = [x[lo:hi].transpose(1, 0, 2)[None] for x in (q, rk, rv)]
            o, lse = reference(*per, causal=causal)
            ref_o[lo:hi] = o[0].transpose(1, 0, 2)
            ref_lse[lo:hi] = lse[0].T
        base = ["--q", self.path(f"{name}-q.npy"), "--k", self.path(f"{name}-k.npy"), "--v",
                self.path(f"{name}-v.npy"), "--cu-seqlens", self.path(f"{name}-cu.npy"), "--kv-dtype", kv,
                "--out", self.path(f"{name}-o.npy"), "--lse", self.path(f"{name}-lse.npy")]
        if causal:
            base.append("--causal")
        for n in ranks:
            for sharding in ("zigzag", "contiguous"):
                label = f"{name} ({n} ranks, {sharding})"
                result = self.run(n, [*base, "--sharding", sharding])
                if result is None or result.returncode != 0:
                    self.check(label, False, "hung" if result is None else f"exit {result.returncode}: "
                               f"{result.stderr[-800:]}")
                    continue
                o = np.load(self.path(f"{name}-o.npy"))
                lse = np.load(self.path(f"{name}-lse.npy"))
                ok = o.shape == ref_o.shape and lse.shape == ref_lse.shape
                ok = ok and bool(np.all(np.abs(o - ref_o) <= ATOL + RTOL * np.abs(ref_o)))
                finite = np.isfinite(ref_lse)
                ok = ok and bool(np.all(lse[~finite] == ref_lse[~finite])) and bool(
                    np.all(np.abs(lse[finite] - ref_lse[finite]) <= ATOL + RTOL * np.abs(ref_lse[finite])))
                self.check(label, ok, f"shapes {o.shape} {lse.shape}; report:\n{result.stdout}")

    def failures(self):
        name = "fail"
        np.save(self.path("fail-q.npy"), np.ones((1, 2, 20, 8), np.float32))
        np.save(self.path("fail-k.npy"), np.ones((1, 2, 20, 8), np.float32))
        np.save(self.path("fail-v.npy"), np.ones((1, 2, 20, 8), np.float32))
        np.save(self.path("fail-bad-k.npy"), np.ones((1, 3, 20, 8), np.float32))
        ok = ["--q", self.path("fail-q.npy"), "--k", self.path("fail-k.npy"), "--v", self.path("fail-v.npy"),
              "--out", self.path("fail-o.npy")]
        for n in (2, 3):
            # A rank dies (SIGKILL under MPI; in-process, it throws) after the scatter, the root that reads and
            # writes the files or the last one: every rank must stop, non-zero, in time, with the reason.
            for failing in (0, n - 1):
                result = self.run(n, [*ok, "--causal", "--fail-rank", str(failing)])
                if result is None:
                    self.check(f"{name}: rank {failing} of {n} fails", False, f"no result within {TIMEOUT} s")
                    continue
                said = result.stdout + result.stderr
                reason = (f"rank {failing} with PID" in said and "signal 9" in said) if self.mpi else (
                    f"rank {failing} failed" in said)
                self.check(f"{name}: rank {failing} of {n} fails", result.returncode != 0 and reason,
                           f"exit {result.returncode}: {said[-800:]}")
            # Bad input on rank 0 (Hq 2 with Hkv 3): non-zero, the reason on stderr.
            bad = ["--q", self.path("fail-q.npy"), "--k", self.path("fail-bad-k.npy"), "--v",
                   self.path("fail-v.npy"), "--out", self.path("fail-o.npy")]
            result = self.run(n, bad)
            self.check(f"{name}: bad input, {n} ranks",
                       result is not None and result.returncode != 0 and "head" in result.stderr.lower(),
                       "hung" if result is None else f"exit {result.returncode}: {result.stderr[-500:]}")
            result = self.run(n, ["--q", self.path("missing.npy"), *ok[2:]])
            self.check(f"{name}: missing file, {n} ranks",
                       result is not None and result.returncode != 0 and "missing.npy" in result.stderr,
                       "hung" if result is None else f"exit {result.returncode}: {result.stderr[-500:]}")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    exe = os.path.abspath(sys.argv[1])
    mpi = "--mpi" in sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        c = RingChecker(exe, mpi, tmp)
        c.case("full", 2, 4, 2, 37, 37, 16, 24)
        c.case("causal", 1, 4, 2, 37, 37, 16, 24, causal=True)
        c.case("gqa-causal-odd", 2, 6, 2, 101, 101, 32, 16, causal=True)
        c.case("mqa", 1, 4, 1, 50, 50, 16, 16, causal=True)
        c.case("window", 1, 2, 2, 47, 47, 16, 16, causal=True, window=(7, 0))
        c.case("f16-kv", 1, 4, 2, 64, 64, 32, 32, causal=True, kv="f16", softcap=20.0)
        c.case("bf16-kv", 1, 2, 1, 33, 33, 16, 16, kv="bf16")
        c.case("empty-shard", 1, 2, 2, 2, 2, 8, 8, causal=True, ranks=(3,))
        c.case("decode", 2, 8, 2, 1, 301, 32, 32, causal=True, kv="f16")
        c.case("decode-chunk", 1, 4, 4, 5, 77, 16, 16, causal=True)
        c.packed("packed", [5, 0, 37, 1, 20, 3], 4, 2, 16, 8)
        c.packed("packed-f16", [100, 57], 8, 2, 32, 32, kv="f16")
        c.failures()
        print(f"ring ({'MPI' if mpi else 'threads'}): {c.passed} passed, {c.failed} failed")
        return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""End-to-end check of `attnbench run` on .npy files written by NumPy.

Usage: python3 scripts/cli_check.py PATH/TO/attnbench

Writes inputs with NumPy (float32, float64, float16, bool and float masks), runs attnbench, and
compares O and LSE with an independent NumPy float64 implementation of the contract (bottom-right
causal, sliding window, GQA, softcap). Then checks that bad inputs fail with a one-line error
naming the file and a non-zero exit status. Prints 'N passed, N failed' and exits non-zero on failure.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

ATOL, RTOL = 3e-4, 2e-5


def reference(q, k, v, causal=False, window=None, mask=None, scale=None, softcap=None):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1 / np.sqrt(D) if scale is None else scale
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    pos = np.arange(Nq)[:, None] + (Nk - Nq)
    j = np.arange(Nk)[None, :]
    visible = np.ones((Nq, Nk), bool)
    if causal:
        visible &= j <= pos
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= j >= pos - left
        if right >= 0:
            visible &= j <= pos + right
    visible = np.broadcast_to(visible, s.shape).copy()
    if mask is not None:
        if mask.dtype == bool:
            visible &= np.broadcast_to(mask, s.shape)
        else:
            s = s + np.broadcast_to(mask.astype(np.float64), s.shape)
    visible &= s != -np.inf
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    empty = ~visible.any(axis=-1, keepdims=True)
    p = np.where(visible, np.exp(s - np.where(empty, 0, m)), 0)
    l = p.sum(axis=-1, keepdims=True)
    o = np.where(empty, 0, (p @ v) / np.where(empty, 1, l))
    lse = np.where(empty[..., 0], -np.inf, (m + np.log(np.where(empty, 1, l)))[..., 0])
    return o, lse


class Checker:
    def __init__(self, exe, tmp):
        self.exe, self.tmp = exe, tmp
        self.passed = self.failed = 0

    def path(self, name):
        return os.path.join(self.tmp, name)

    def run(self, args, env=None):
        return subprocess.run([self.exe, "run", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=None if env is None else {**os.environ, **env})

    def record(self, ok, name, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name}: {detail}")

    def parity(self, name, q, k, v, flags=(), mask=None, **ref_kwargs):
        for t, arr in (("q", q), ("k", k), ("v", v)):
            np.save(self.path(f"{name}-{t}.npy"), arr)
        args = ["--q", self.path(f"{name}-q.npy"), "--k", self.path(f"{name}-k.npy"), "--v", self.path(f"{name}-v.npy"),
                "--out", self.path(f"{name}-o.npy"), "--lse", self.path(f"{name}-lse.npy"), *flags]
        if mask is not None:
            np.save(self.path(f"{name}-mask.npy"), mask)
            args += ["--mask", self.path(f"{name}-mask.npy")]
        for backend in BACKENDS:
            r = self.run(args + ["--backend", backend])
            if r.returncode != 0:
                self.record(False, f"{name} [{backend}]", r.stderr.strip())
                continue
            o = np.load(self.path(f"{name}-o.npy"))
            lse = np.load(self.path(f"{name}-lse.npy"))
            # Inputs as attnbench sees them: converted to float32 first.
            ro, rlse = reference(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), mask=mask, **ref_kwargs)
            ok = o.dtype == np.float32 and o.shape == ro.shape and np.all(np.abs(o - ro) <= ATOL + RTOL * np.abs(ro))
            finite = np.isfinite(rlse)
            ok = ok and np.array_equal(np.isneginf(lse), np.isneginf(rlse))
            ok = ok and np.all(np.abs(lse[finite] - rlse[finite]) <= 1e-3)
            self.record(ok, f"{name} [{backend}]", f"max err {np.max(np.abs(o - ro)) if o.shape == ro.shape else o.shape}")

    def failure(self, name, args, must_mention, env=None):
        r = self.run(args, env)
        lines = [line for line in r.stderr.strip().splitlines() if line]
        ok = r.returncode != 0 and len(lines) == 1 and must_mention in lines[0] and "Traceback" not in r.stderr
        self.record(ok, f"error: {name}", f"exit {r.returncode}, stderr {r.stderr.strip()!r}")


def to_bf16(x):
    """float32 -> bfloat16 (round to nearest even), widened back to float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return rounded.astype(np.uint32).view(np.float32)


def rounded(x, dtype):
    x = np.asarray(x, np.float32)
    return {"f32": x, "f16": x.astype(np.float16).astype(np.float32), "bf16": to_bf16(x)}[dtype]


UNIT = {"f32": 0.0, "f16": 2.0**-11, "bf16": 2.0**-8}


def typed_parity(c, name, q, k, v, layout="bhsd", qtype="f32", kvtype="f32", otype="f32", flags=(), **ref_kwargs):
    """run with --layout/--dtype/--kv-dtype/--out-dtype against the reference of the rounded inputs."""
    store = (lambda a: a) if layout == "bhsd" else (lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3)))
    for t, arr in (("q", q), ("k", k), ("v", v)):
        np.save(c.path(f"{name}-{t}.npy"), store(arr))
    args = ["--q", c.path(f"{name}-q.npy"), "--k", c.path(f"{name}-k.npy"), "--v", c.path(f"{name}-v.npy"),
            "--out", c.path(f"{name}-o.npy"), "--layout", layout, "--dtype", qtype, "--kv-dtype", kvtype,
            "--out-dtype", otype, *flags]
    ro, _ = reference(rounded(q, qtype), rounded(k, kvtype), rounded(v, kvtype), **ref_kwargs)
    ro = store(ro)
    for backend in BACKENDS:
        r = c.run(args + ["--backend", backend])
        if r.returncode != 0:
            c.record(False, f"{name} [{backend}]", r.stderr.strip())
            continue
        o = np.load(c.path(f"{name}-o.npy"))
        want = np.float16 if otype == "f16" else np.float32
        err = np.abs(o.astype(np.float64) - ro)
        ok = o.dtype == want and o.shape == ro.shape and np.all(err <= ATOL + (RTOL + UNIT[otype]) * np.abs(ro))
        c.record(ok, f"{name} [{backend}]", f"dtype {o.dtype}, shape {o.shape}, max err {err.max() if o.shape == ro.shape else '-'}")


NO_OPENCL = os.environ.get("ATTNBENCH_EXPECT_NO_OPENCL") == "1"
BACKENDS = ("naive", "blas", "auto") if NO_OPENCL else ("naive", "blas", "opencl", "auto")


def harness_checks(c, q):
    """The harness subcommands: verify, bench (JSON/CSV/plot), report, map, devices."""
    import csv
    import json
    import xml.etree.ElementTree as ET
    import zlib
    import base64

    def run(args):
        return subprocess.run([c.exe, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, "CI": "true"})

    r = run(["verify", "--quick", "--json", c.path("verify.json")])
    ok = r.returncode == 0 and "pass" in r.stdout and "FAIL" not in r.stdout
    if ok:
        v = json.load(open(c.path("verify.json")))
        ok = v["passed"] and len(v["cells"]) >= 14 * (2 if NO_OPENCL else 4) and all("nmse" in cell for cell in v["cells"])
    c.record(ok, "verify --quick passes for every backend", r.stdout[-2000:] + r.stderr[-2000:])

    r = run(["bench", "--shapes", "small-128", "decode-4k", "t:b=1,hq=2,hkv=1,nq=33,nk=70,d=24,causal",
             "--repeat", "2", "--json", c.path("bench.json"), "--csv", c.path("bench.csv"), "--plot", c.path("bench.svg")])
    ok = r.returncode == 0
    detail = r.stderr[-1500:]
    if ok:
        rows = json.load(open(c.path("bench.json")))["results"]
        required = {"shape", "backend", "device", "median_seconds", "gflops", "roofline_fraction", "max_abs_error"}
        ran = [row for row in rows if not row.get("skipped")]
        ok = len(rows) == 12 and all(required <= row.keys() for row in ran)
        ok = ok and all(row["median_seconds"] > 0 and row.get("within_tolerance") for row in ran)
        ok = ok and all(row["skipped"] for row in rows if row not in ran)
        ok = ok and any(row["backend"] == "auto" for row in ran)
        if NO_OPENCL:
            ok = ok and all("OpenCL" in row["skipped"] for row in rows if row["backend"] == "opencl")
        ok = ok and len(list(csv.DictReader(open(c.path("bench.csv"))))) == len(rows)
        ET.parse(c.path("bench.svg"))
        detail = json.dumps(rows)[:1500]
    c.record(ok, "bench writes JSON, CSV and plot", detail)

    out = c.path("report")
    r = run(["report", "--shapes", "small-128", "prefill-512", "--out", out, "--repeat", "2"])
    ok = r.returncode == 0 and all(os.path.exists(os.path.join(out, f)) for f in ("report.json", "results.csv", "throughput.svg"))
    if ok:
        report = json.load(open(os.path.join(out, "report.json")))
        svg = ET.parse(os.path.join(out, "throughput.svg")).getroot()
        texts = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
        ok = report["verification"]["passed"] and "roofline" in texts and "blas" in texts and "GFLOP/s" in texts
    c.record(ok, "report writes report.json, results.csv, throughput.svg", r.stdout[-1500:] + r.stderr[-1500:])

    r = run(["map", "--q", c.path("q.npy"), "--k", c.path("k.npy"), "--head", "1", "--causal", "--out", c.path("map.svg")])
    ok = r.returncode == 0
    if ok:
        root = ET.parse(c.path("map.svg")).getroot()
        image = next(root.iter("{http://www.w3.org/2000/svg}image"))
        href = image.get("{http://www.w3.org/1999/xlink}href")
        png = base64.b64decode(href.split(",", 1)[1])
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        idat = png[png.index(b"IDAT") + 4: png.index(b"IEND") - 8]
        pixels = zlib.decompress(idat)
        ok = png[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (q.shape[2], q.shape[2]) and len(pixels) == height * (3 * width + 1)
    c.record(ok, "map draws an SVG heatmap with a valid PNG", r.stderr[-800:])
    # A boolean mask hides every third key: exactly those cells are grey, every other cell is coloured.
    n = q.shape[2]
    allowed = np.array([[j % 3 != 0 for j in range(n)] for i in range(n)])
    np.save(c.path("map_mask.npy"), allowed)
    r = run(["map", "--q", c.path("q.npy"), "--k", c.path("k.npy"), "--mask", c.path("map_mask.npy"),
             "--out", c.path("map_mask.svg")])
    ok = r.returncode == 0
    if ok:
        root = ET.parse(c.path("map_mask.svg")).getroot()
        href = next(root.iter("{http://www.w3.org/2000/svg}image")).get("{http://www.w3.org/1999/xlink}href")
        png = base64.b64decode(href.split(",", 1)[1])
        raw = zlib.decompress(png[png.index(b"IDAT") + 4: png.index(b"IEND") - 8])
        grey = [[raw[i * (3 * n + 1) + 1 + 3 * j: i * (3 * n + 1) + 4 + 3 * j] == bytes([235, 235, 235])
                 for j in range(n)] for i in range(n)]
        ok = all(grey[i][j] == (not allowed[i][j]) for i in range(n) for j in range(n))
    c.record(ok, "map applies --mask: exactly the hidden keys are grey", r.stderr[-800:])
    r = run(["map", "--q", c.path("q.npy"), "--k", c.path("k.npy"), "--head", "9", "--out", c.path("m.svg")])
    c.record(r.returncode != 0 and "--head 9" in r.stderr, "map refuses a head that does not exist", r.stderr)

    r = run(["devices", "--json"])
    ok = r.returncode == 0
    if ok:
        d = json.loads(r.stdout)
        ok = d["cpu"]["logicalCores"] > 0 and (bool(d["opencl"]) != NO_OPENCL)
    c.record(ok, "devices --json", r.stdout[-800:] + r.stderr[-800:])



def serving_checks(c, rng):
    """run with --cu-seqlens-q/k, --cache-lengths and --page-size against per-sequence references."""
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    hq, hkv, d = 4, 2, 16
    # Varlen: lengths 0, 1 and long side by side; files packed [total, H, D].
    nq, nk = [3, 0, 1, 40], [5, 2, 0, 60]
    cq, ck = np.concatenate([[0], np.cumsum(nq)]), np.concatenate([[0], np.cumsum(nk)])
    q, k, v = f32(cq[-1], hq, d), f32(ck[-1], hkv, d), f32(ck[-1], hkv, d)
    np.save(c.path("vl-q.npy"), q); np.save(c.path("vl-k.npy"), k); np.save(c.path("vl-v.npy"), v)
    np.save(c.path("vl-cq.npy"), cq.astype(np.int32)); np.save(c.path("vl-ck.npy"), ck.astype(np.int64))
    ro, rl = np.zeros((cq[-1], hq, d)), np.full((cq[-1], hq), -np.inf)
    for s in range(len(nq)):
        if nq[s] and nk[s]:
            o, l = reference(q[None, cq[s]:cq[s + 1]].transpose(0, 2, 1, 3), k[None, ck[s]:ck[s + 1]].transpose(0, 2, 1, 3),
                             v[None, ck[s]:ck[s + 1]].transpose(0, 2, 1, 3), causal=True)
            ro[cq[s]:cq[s + 1]] = o[0].transpose(1, 0, 2)
            rl[cq[s]:cq[s + 1]] = l[0].T
    args = ["--q", c.path("vl-q.npy"), "--k", c.path("vl-k.npy"), "--v", c.path("vl-v.npy"), "--out", c.path("vl-o.npy"),
            "--lse", c.path("vl-lse.npy"), "--cu-seqlens-q", c.path("vl-cq.npy"), "--cu-seqlens-k", c.path("vl-ck.npy"),
            "--causal"]
    for backend in BACKENDS:
        r = c.run(args + ["--backend", backend])
        if r.returncode != 0:
            c.record(False, f"varlen [{backend}]", r.stderr.strip())
            continue
        o, l = np.load(c.path("vl-o.npy")), np.load(c.path("vl-lse.npy"))
        ok = o.shape == ro.shape and np.all(np.abs(o - ro) <= ATOL + RTOL * np.abs(ro))
        ok = ok and np.array_equal(np.isneginf(l), np.isneginf(rl)) and np.all(np.abs(l - rl)[np.isfinite(rl)] <= 1e-3)
        c.record(ok, f"varlen [{backend}]", f"shape {o.shape}, max err {np.max(np.abs(o - ro)) if o.shape == ro.shape else '-'}")

    # Cache lengths (bshd caches with spare capacity, fp16 K/V), then the same through pages of 1, 16, 256.
    lengths = np.array([1, 700, 0, 33], np.int32)
    B, C = len(lengths), 710
    q, k, v = f32(B, 2, hq, d), f32(B, C, hkv, d), f32(B, C, hkv, d)
    np.save(c.path("cl-q.npy"), q); np.save(c.path("cl-k.npy"), k); np.save(c.path("cl-v.npy"), v)
    np.save(c.path("cl-len.npy"), lengths)
    ro = np.zeros((B, 2, hq, d))
    for b in range(B):
        if lengths[b]:
            o, _ = reference(q[b:b + 1].transpose(0, 2, 1, 3), rounded(k[b:b + 1, :lengths[b]], "f16").transpose(0, 2, 1, 3),
                             rounded(v[b:b + 1, :lengths[b]], "f16").transpose(0, 2, 1, 3), causal=True)
            ro[b] = o[0].transpose(1, 0, 2)
    args = ["--q", c.path("cl-q.npy"), "--k", c.path("cl-k.npy"), "--v", c.path("cl-v.npy"), "--out", c.path("cl-o.npy"),
            "--cache-lengths", c.path("cl-len.npy"), "--layout", "bshd", "--kv-dtype", "f16", "--causal"]
    for extra in ([], ["--page-size", "1"], ["--page-size", "16"], ["--page-size", "256"]):
        for backend in BACKENDS:
            name = f"cache-lengths{' paged ' + extra[1] if extra else ''} [{backend}]"
            r = c.run(args + extra + ["--backend", backend])
            if r.returncode != 0:
                c.record(False, name, r.stderr.strip())
                continue
            o = np.load(c.path("cl-o.npy"))
            ok = o.shape == ro.shape and np.all(np.abs(o - ro) <= ATOL + RTOL * np.abs(ro))
            c.record(ok, name, f"shape {o.shape}, max err {np.max(np.abs(o - ro)) if o.shape == ro.shape else '-'}")

    base = ["--q", c.path("vl-q.npy"), "--k", c.path("vl-k.npy"), "--v", c.path("vl-v.npy"), "--out", c.path("o.npy")]
    np.save(c.path("bad-cq.npy"), np.array([0, 3, 2, 4, 44], np.int32))
    np.save(c.path("long-ck.npy"), np.array([0, 5, 7, 7, 99], np.int32))
    np.save(c.path("float-cq.npy"), np.array([0, 3, 4], np.float32))
    c.failure("decreasing offsets", base + ["--cu-seqlens-q", c.path("bad-cq.npy"), "--cu-seqlens-k", c.path("vl-ck.npy")],
              "cuSeqlensQ[2]")
    c.failure("offsets beyond the tensor", base + ["--cu-seqlens-q", c.path("vl-cq.npy"), "--cu-seqlens-k", c.path("long-ck.npy")],
              "cuSeqlensK[4]")
    c.failure("float offsets", base + ["--cu-seqlens-q", c.path("float-cq.npy"), "--cu-seqlens-k", c.path("vl-ck.npy")],
              "float-cq.npy")
    c.failure("offsets without their pair", base + ["--cu-seqlens-q", c.path("vl-cq.npy")], "--cu-seqlens-k")
    np.save(c.path("too-long.npy"), np.array([1, 711, 0, 3], np.int32))
    c.failure("length beyond capacity", ["--q", c.path("cl-q.npy"), "--k", c.path("cl-k.npy"), "--v", c.path("cl-v.npy"),
                                          "--out", c.path("o.npy"), "--layout", "bshd", "--cache-lengths", c.path("too-long.npy")],
              "cache length 711")
    c.failure("bad page size", ["--q", c.path("cl-q.npy"), "--k", c.path("cl-k.npy"), "--v", c.path("cl-v.npy"),
                                 "--out", c.path("o.npy"), "--layout", "bshd", "--cache-lengths", c.path("cl-len.npy"),
                                 "--page-size", "24"], "page size 24")


def fault_checks(c, base):
    """OpenCL calls failed on purpose through the fault-injection fixture, loaded the way users load
    another OpenCL library (ATTENTIONKIT_OPENCL_LIBRARY): one line naming the call and the status."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "faulty_opencl.c")
    library = c.path("libfaulty_opencl.so")
    build = subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-shared", "-fPIC", "-o", library, source, "-ldl"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        c.record(False, "fault fixture builds", build.stderr.strip())
        return
    cache = c.path("fault-cache")
    for call, status, name in (("clEnqueueNDRangeKernel", -5, "CL_OUT_OF_RESOURCES"),
                               ("clCreateBuffer", -4, "CL_MEM_OBJECT_ALLOCATION_FAILURE"),
                               ("clBuildProgram", -11, "CL_BUILD_PROGRAM_FAILURE")):
        env = {"ATTENTIONKIT_OPENCL_LIBRARY": library, "FAULTY_OPENCL_FAIL": f"{call}:{status}",
               "ATTENTIONKIT_CACHE_DIR": cache}
        r = c.run(base + ["--backend", "opencl"], env)
        ok = r.returncode != 0 and call in r.stderr and name in r.stderr and "Traceback" not in r.stderr
        c.record(ok, f"error: injected {call} -> {name}", f"exit {r.returncode}, stderr {r.stderr.strip()!r}")
    r = c.run(base + ["--backend", "opencl"], {"ATTENTIONKIT_OPENCL_LIBRARY": library, "ATTENTIONKIT_CACHE_DIR": cache})
    c.record(r.returncode == 0, "the fixture without a fault runs", r.stderr.strip())


def profile_checks(c):
    """A damaged profile.json: attnbench runs on the built-in defaults and says which file it ignored."""
    cache = c.path("damaged-cache")
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "profile.json"), "w") as f:
        f.write('{"identity": "cpu=x", "backends": [')
    r = subprocess.run([c.exe, "devices"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "ATTENTIONKIT_CACHE_DIR": cache})
    ok = r.returncode == 0 and "profile.json ignored: not a profile: invalid JSON" in r.stdout
    c.record(ok, "damaged profile.json: defaults, and the reason", (r.stdout + r.stderr)[-400:])


def main():
    exe = os.path.abspath(sys.argv[1])
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        c = Checker(exe, tmp)
        f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
        c.parity("plain", f32(2, 4, 33, 16), f32(2, 4, 33, 16), f32(2, 4, 33, 16))
        c.parity("gqa-causal-cross", f32(1, 8, 5, 24), f32(1, 2, 70, 24), f32(1, 2, 70, 40), ["--causal"], causal=True)
        c.parity("window-softcap-scale", f32(1, 2, 64, 8), f32(1, 2, 64, 8), f32(1, 2, 64, 8),
                 ["--window", "7,2", "--softcap", "3", "--scale", "0.7"], window=(7, 2), softcap=3.0, scale=0.7)
        c.parity("sliding-window", f32(1, 2, 40, 8), f32(1, 2, 40, 8), f32(1, 2, 40, 8),
                 ["--causal", "--window=4,0"], causal=True, window=(4, 0))
        bool_mask = rng.random((1, 4, 9, 30)) < 0.6
        bool_mask[0, 1, 3, :] = False  # a fully masked row
        c.parity("bool-mask", f32(2, 4, 9, 16), f32(2, 4, 30, 16), f32(2, 4, 30, 16), mask=bool_mask)
        float_mask = rng.standard_normal((9, 30)).astype(np.float32)
        float_mask[2, :] = -np.inf
        c.parity("float-mask", f32(1, 2, 9, 16), f32(1, 2, 30, 16), f32(1, 2, 30, 16), mask=float_mask)
        c.parity("float64-inputs", rng.standard_normal((1, 2, 7, 5)), rng.standard_normal((1, 2, 7, 5)), rng.standard_normal((1, 2, 7, 5)))
        c.parity("float16-inputs", f32(1, 2, 7, 5).astype(np.float16), f32(1, 2, 7, 5).astype(np.float16), f32(1, 2, 7, 5).astype(np.float16))

        # Layouts and storage types: files in [B, N, H, D], inputs rounded to fp16/bf16, fp16 output.
        typed_parity(c, "bshd-causal", f32(2, 4, 21, 16), f32(2, 2, 21, 16), f32(2, 2, 21, 8), layout="bshd",
                     flags=["--causal"], causal=True)
        typed_parity(c, "f16-io", f32(1, 4, 19, 32), f32(1, 4, 19, 32), f32(1, 4, 19, 32), qtype="f16", kvtype="f16",
                     otype="f16", flags=["--window", "5,1"], window=(5, 1))
        typed_parity(c, "bf16-kv-decode", f32(1, 8, 1, 64), f32(1, 2, 2500, 64), f32(1, 2, 2500, 64), kvtype="bf16")
        typed_parity(c, "bshd-f16-kv-decode", f32(2, 8, 2, 32), f32(2, 2, 3000, 32), f32(2, 2, 3000, 32),
                     layout="bshd", kvtype="f16", flags=["--causal"], causal=True)

        # Bad inputs: one line on stderr naming the problem, non-zero exit.
        q = f32(1, 2, 4, 8)
        np.save(c.path("q.npy"), q)
        np.save(c.path("k.npy"), q)
        np.save(c.path("v.npy"), q)
        np.save(c.path("fortran.npy"), np.asfortranarray(f32(1, 2, 4, 8)))
        np.save(c.path("bigendian.npy"), q.astype(">f4"))
        np.save(c.path("int.npy"), np.zeros((1, 2, 4, 8), np.int32))
        np.save(c.path("k3.npy"), f32(1, 3, 4, 8))
        np.save(c.path("kD.npy"), f32(1, 2, 4, 7))
        np.save(c.path("mask-bad.npy"), np.ones((3, 4, 4), bool))
        with open(c.path("truncated.npy"), "wb") as f:
            f.write(open(c.path("q.npy"), "rb").read()[:-10])
        with open(c.path("garbage.npy"), "wb") as f:
            f.write(b"not a numpy file at all")
        base = ["--q", c.path("q.npy"), "--k", c.path("k.npy"), "--v", c.path("v.npy"), "--out", c.path("o.npy")]

        c.failure("bf16 .npy output", base + ["--out-dtype", "bf16"], "bf16")
        np.save(c.path("q3.npy"), f32(2, 4, 8))
        c.failure("bshd file of rank 3", ["--q", c.path("q3.npy"), "--k", c.path("k.npy"), "--v", c.path("v.npy"),
                                          "--out", c.path("o.npy"), "--layout", "bshd"], "q3.npy")

        def swap(flag, name):
            args = list(base)
            args[args.index(flag) + 1] = c.path(name)
            return args

        c.failure("missing file", swap("--k", "nope.npy"), "nope.npy")
        c.failure("fortran order", swap("--q", "fortran.npy"), "fortran.npy")
        c.failure("big endian", swap("--v", "bigendian.npy"), "bigendian.npy")
        c.failure("integer dtype", swap("--q", "int.npy"), "int.npy")
        c.failure("truncated", swap("--q", "truncated.npy"), "truncated.npy")
        c.failure("not npy", swap("--k", "garbage.npy"), "garbage.npy")
        np.save(c.path("v3.npy"), f32(1, 3, 4, 8))
        c.failure("heads not divisible", swap("--k", "k3.npy")[:5] + [c.path("v3.npy")] + swap("--k", "k3.npy")[6:], "multiple")
        c.failure("head dim mismatch", swap("--k", "kD.npy"), "head dimension")
        c.failure("mask not broadcastable", base + ["--mask", c.path("mask-bad.npy")], "mask-bad.npy")
        c.failure("bad window", base + ["--window=-3,0"], "window")
        c.failure("bad softcap", base + ["--softcap", "0"], "softcap")
        c.failure("unwritable output", swap("--out", "no/such/dir/o.npy"), "o.npy")

        if NO_OPENCL:
            # Without OpenCL: --backend opencl fails with one line saying why; auto falls back and says so.
            c.failure("opencl without a platform", base + ["--backend", "opencl"], "OpenCL")
            r = c.run(base + ["--backend", "auto"])
            c.record(r.returncode == 0 and "not possible: opencl:0 (no OpenCL platform" in r.stderr, "auto falls back to the CPU and says why", r.stderr.strip())
        else:
            c.failure("no such OpenCL device", base + ["--backend", "opencl", "--device", "42"], "device 42")
            # The GPU kernel (tiles of a typical NVIDIA / small mobile GPU) on this device.
            for vendor in ("NVIDIA", "Mali"):
                c.parity(f"gpu-shaped-{vendor}", f32(1, 8, 37, 24), f32(1, 2, 90, 24), f32(1, 2, 90, 40),
                         ["--causal", "--kernel-config", f"gpu={vendor}"], causal=True)
                typed_parity(c, f"gpu-shaped-{vendor}-f16-kv-decode", f32(1, 8, 1, 64), f32(1, 2, 1500, 64),
                             f32(1, 2, 1500, 64), layout="bshd", kvtype="f16", flags=["--kernel-config", f"gpu={vendor}"])
            c.failure("malformed GPU tiles", base + ["--backend", "opencl", "--kernel-config", "tiles=5x4x2x8"],
                      "5 rows do not split over 4 row groups")
            fault_checks(c, base)
        profile_checks(c)

        serving_checks(c, rng)
        harness_checks(c, q)
        print(f"{c.passed} passed, {c.failed} failed")
        return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())

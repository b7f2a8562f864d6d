"""A random-weight Llama-style causal LM in Hugging Face transformers, attn_implementation "attentionkit"
against "sdpa" (torch's CPU flash path), timed in the same run: the prefill of a long prompt and the
decode tokens per second at that context, with the time spent inside the attention function of each.

    scripts/install-python --test
    env -u OPENBLAS_CORETYPE .venv/bin/python Benchmarks/python/transformers_bench.py [--prompt 4096] [--decode 32]

The attention-only figures are comparable with `attnbench bench --shapes` on the same shapes (the script
prints the command). Not a test: figures drift by up to 30% on shared machines, so the implementations
are alternated and each row is the median of its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import attentionkit  # noqa: E402
import attentionkit.transformers as akt  # noqa: E402


class Timed:
    """An attention function that adds its own wall time to a counter."""

    def __init__(self, function):
        self.function = function
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.function(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return result

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=32, help="tokens generated after the prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", default="auto", help="AttentionKit backend: auto, blas, opencl:0, ...")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.decode + 16)
    dtype = getattr(torch, args.dtype)
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    head_dim = args.hidden // args.heads

    context = attentionkit.Context(args.backend)
    ours = Timed(akt.make_attention_function(context))
    theirs = Timed(sdpa_attention_forward)
    transformers.AttentionInterface.register("attentionkit_timed", ours)
    AttentionMaskInterface.register("attentionkit_timed", sdpa_mask)
    transformers.AttentionInterface.register("sdpa_timed", theirs)
    AttentionMaskInterface.register("sdpa_timed", sdpa_mask)
    implementations = {"attentionkit": ("attentionkit_timed", ours), "sdpa": ("sdpa_timed", theirs)}

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rows = {name: {"prefill": [], "prefill_attention": [], "decode": [], "decode_attention": []}
            for name in implementations}
    tokens = {}
    for round_index in range(args.rounds):
        for name, (registered, timer) in implementations.items():
            model.set_attn_implementation(registered)
            with torch.inference_mode():
                timer.reset()
                start = time.perf_counter()
                out = model(prompt, use_cache=True, logits_to_keep=1)
                rows[name]["prefill"].append(time.perf_counter() - start)
                rows[name]["prefill_attention"].append(timer.seconds)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                generated = [token]
                timer.reset()
                start = time.perf_counter()
                for _ in range(args.decode):
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    generated.append(token)
                rows[name]["decode"].append((time.perf_counter() - start) / args.decode)
                rows[name]["decode_attention"].append(timer.seconds / args.decode)
            tokens[name] = torch.cat(generated, 1)
            print(f"round {round_index + 1} {name}: prefill {rows[name]['prefill'][-1]:.3f} s "
                  f"(attention {rows[name]['prefill_attention'][-1]:.3f} s), decode "
                  f"{rows[name]['decode'][-1] * 1e3:.1f} ms/token (attention "
                  f"{rows[name]['decode_attention'][-1] * 1e3:.2f} ms)", flush=True)

    median = {name: {key: statistics.median(values) for key, values in row.items()} for name, row in rows.items()}
    a, s = median["attentionkit"], median["sdpa"]
    print()
    print(f"Llama-style, {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads "
          f"(head dim {head_dim}), {args.dtype}, prompt {args.prompt}, {args.decode} decode tokens; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"AttentionKit backend: {context.last_backend}")
    print(f"{'':34}{'attentionkit':>14}{'sdpa':>12}{'sdpa / ours':>13}")
    print(f"{'prefill, whole model (s)':34}{a['prefill']:14.3f}{s['prefill']:12.3f}{s['prefill'] / a['prefill']:13.2f}")
    print(f"{'prefill, attention only (s)':34}{a['prefill_attention']:14.3f}{s['prefill_attention']:12.3f}"
          f"{s['prefill_attention'] / a['prefill_attention']:13.2f}")
    print(f"{'decode, whole model (tokens/s)':34}{1 / a['decode']:14.1f}{1 / s['decode']:12.1f}"
          f"{s['decode'] / a['decode']:13.2f}")
    print(f"{'decode, attention per token (ms)':34}{a['decode_attention'] * 1e3:14.2f}{s['decode_attention'] * 1e3:12.2f}"
          f"{s['decode_attention'] / a['decode_attention']:13.2f}")
    per_layer_prefill = a["prefill_attention"] / args.layers * 1e3
    per_layer_decode = a["decode_attention"] / args.layers * 1e3
    print(f"attentionkit per layer call: prefill {per_layer_prefill:.1f} ms, decode {per_layer_decode:.3f} ms")
    print("same generated tokens:", torch.equal(tokens["attentionkit"], tokens["sdpa"]))
    kv = "f32" if args.dtype == "float32" else "bf16"
    print("attnbench on the same shapes (attention only):\n  env -u OPENBLAS_CORETYPE .build/release/attnbench bench "
          f"--backend blas auto --kv-dtype {kv} --shapes "
          f"lm-prefill:b=1,hq={args.heads},hkv={args.kv_heads},nq={args.prompt},nk={args.prompt},d={head_dim},"
          f"dv={head_dim},causal "
          f"lm-decode:b=1,hq={args.heads},hkv={args.kv_heads},nq=1,nk={args.prompt + args.decode // 2},d={head_dim},"
          f"dv={head_dim},causal")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median": median, "rounds": rows}, f, indent=2)


if __name__ == "__main__":
    main()

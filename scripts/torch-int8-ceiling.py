#!/usr/bin/env python3
"""The int8 ceiling of cuBLAS on this GPU, beside its bf16 Linear, at the Wan linear shapes.

torch._int_mm is cuBLASLt's plain int8 x int8 -> int32 GEMM: no scales, no quantisation, no
bf16 output, so it bounds what a block-scaled W8A8 linear (ours: quantise + GEMM + per-tile fold
+ bf16 store) can reach with cuBLAS's kernels. Printed beside F.linear in bf16 with a bias, timed
the same way (CUDA events, median of 20 after 5 warm-up runs). Writes $OUT/int8_ceiling.json.
"""
import json
import os

import torch

SHAPES = [(32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536),
          (75600, 5120, 5120), (75600, 5120, 13824), (75600, 13824, 5120)]


def median_ms(fn, iters=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    results = {}
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        bf16 = median_ms(lambda: torch.nn.functional.linear(x, w, b))
        xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        int8 = median_ms(lambda: torch._int_mm(xq, wq.t()))
        ops = 2 * m * n * k
        results[f"{m}x{k}x{n}"] = {"bf16_linear_ms": bf16, "int8_mm_ms": int8}
        print(f"M {m}, K {k}, N {n}: bf16 F.linear {bf16:.3f} ms ({ops / bf16 / 1e9:.0f} TFLOPS), "
              f"int8 _int_mm {int8:.3f} ms ({ops / int8 / 1e9:.0f} TOPS) = {bf16 / int8:.2f}x bf16",
              flush=True)
        del x, w, b, xq, wq
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "int8_ceiling.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

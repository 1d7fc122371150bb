"""Diagnose the benchmark's a16w8-int8 time on 8192x28672 at M = 1 against a direct timing
(H200): the same op timed several ways in one process. Prints one line per way."""

import torch
import torch.nn.functional as F

from lowbit import quantize_tensor
from lowbit.bench import run as R
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import pack_weight, weight_only_matmul

n, k = 8192, 28672
w = R._randn((n, k), R._seed(0, "llama3-70b.down", "w"), torch.device("cuda"), scale=0.02)
x = R._randn((1, k), R._seed(0, "llama3-70b.down", 1), torch.device("cuda"))
qt = quantize_tensor(w, "int8")
pw = pack_weight(qt, "cuda")
c = pw.row_codes
print("row codes", c.dtype, tuple(c.shape), c.stride(), "contiguous", c.is_contiguous(), "ptr % 128", c.data_ptr() % 128)
print("bf16", round(time_cuda_graph(lambda: F.linear(x, w)), 1))
for rep in (5.0, 20.0):
    print(f"direct, one copy, rep {rep:.0f} ms", round(time_cuda_graph(lambda: weight_only_matmul(x, pw), rep), 1))
pw2 = pack_weight(quantize_tensor(w, "int8"), "cuda")
print("two distinct copies", round(time_cuda_graph(R._cycle([lambda x: weight_only_matmul(x, pw),
                                                              lambda x: weight_only_matmul(x, pw2)], x)), 1))
prep = R.lowbit_method("a16w8-int8", w)
print("bench op (first)", round(time_cuda_graph(lambda: prep.first(x)), 1))
print("bench op, rotated as the bench does", round(time_cuda_graph(R._cycle([prep.first, prep.make()], x)), 1))

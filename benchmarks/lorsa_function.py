"""LoRSA's adapter path as one autograd function (``LoRSADelta``, the layer's forward) against the same maths
composed of torch operations (what autograd records without it), forward + backward at the shapes of a
MiniLM projection (N tokens x 384 -> 384, |S| = 64, r = 48). The two run alternately, so load on the
machine affects both; the ratio of the medians is the figure. The outputs and gradients are checked equal
first.

Examples::

    python -m benchmarks.lorsa_function --threads 1
    python -m benchmarks.lorsa_function --device cuda --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import sync
from spec_lightning.methods.lorsa.function import LoRSADelta


def composed(
    x: torch.Tensor,
    in_basis: torch.Tensor,
    out_basis: torch.Tensor,
    sigma: torch.Tensor,
    delta_sigma: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
) -> torch.Tensor:
    """The same y_Δ from torch operations, differentiated by autograd."""
    s = sigma.numel()
    h = x @ in_basis
    a, b = h[:, :s], h[:, s:]
    z = torch.addmm(a, b, q) * (sigma + delta_sigma)
    return torch.cat([z - a * sigma, z @ p.T], 1) @ out_basis.T


def inputs(tokens: int, width: int, s: int, r: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(tokens, width), (width, s + r), (width, s + r), (s,), (s,), (r, s), (r, s)]
    tensors = [torch.randn(shape, generator=g).to(device) for shape in shapes]
    for i in (0, 4, 5, 6):  # x, Δσ, p, q
        tensors[i].requires_grad_()
    return tensors


def step(function: object, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = function(*tensors)
    return list(torch.autograd.grad(out.square().sum(), [tensors[i] for i in (0, 4, 5, 6)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048, help="N: batch x sequence length")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lorsa_function.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tensors = inputs(args.tokens, 384, 64, 48, device)
    for ours, reference in zip(step(LoRSADelta.apply, tensors), step(composed, tensors), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {"function": [], "composed": []}
    for _ in range(10):  # warm-up
        step(LoRSADelta.apply, tensors), step(composed, tensors)
    for _ in range(args.repeats):
        for name, function in (("function", LoRSADelta.apply), ("composed", composed)):
            sync(device)
            start = time.perf_counter()
            step(function, tensors)
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": args.threads,
        "tokens": args.tokens,
        "median_ms": {name: round(1000 * value, 4) for name, value in medians.items()},
        "function_over_composed": round(medians["function"] / medians["composed"], 3),
    }
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

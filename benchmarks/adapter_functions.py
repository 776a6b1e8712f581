"""The spectral adapters' fused paths against the same maths composed of torch operations (what autograd
records without them), forward + backward at the shapes of a MiniLM projection (N tokens x 384 -> 384):
LoRSA's ``LoRSADelta`` (|S| = 64, r = 48) and SpecLoRA's ``SpecLoRADelta`` (k = 32, LoRA r = 8, with
dropout on the LoRA input, as in training). Each pair runs alternately, so load on the machine affects
both; the ratio of the medians is the figure. Outputs and gradients are checked equal first.

Examples::

    python -m benchmarks.adapter_functions --threads 2
    python -m benchmarks.adapter_functions --device cuda --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import sync
from spec_lightning.methods.lorsa.function import LoRSADelta
from spec_lightning.methods.speclora.function import SpecLoRADelta

Adapter = Callable[[list[torch.Tensor]], torch.Tensor]


def lorsa_composed(t: list[torch.Tensor]) -> torch.Tensor:
    """LoRSA's y_Δ from torch operations: inputs x, [V_S | Q], [U_S | P], σ, Δσ, p, q."""
    x, in_basis, out_basis, sigma, delta_sigma, p, q = t
    s = sigma.numel()
    h = x @ in_basis
    a, b = h[:, :s], h[:, s:]
    z = torch.addmm(a, b, q) * (sigma + delta_sigma)
    return torch.cat([z - a * sigma, z @ p.T], 1) @ out_basis.T


def speclora_composed(t: list[torch.Tensor]) -> torch.Tensor:
    """SpecLoRA's y_Δ as the layer computed it before SpecLoRADelta: inputs x, V_k, U_k, σ_k, m, A, B."""
    x, v_k, u_k, sigma_k, mask, a, b = t
    torch.manual_seed(0)  # the same dropout mask as the fused path's
    x_d = torch.nn.functional.dropout(x, 0.1, training=True)
    return torch.addmm(((x @ v_k) * (mask * sigma_k)) @ u_k.T, x_d @ a.T, b.T, alpha=2.0)


def speclora_fused(t: list[torch.Tensor]) -> torch.Tensor:
    x, v_k, u_k, sigma_k, mask, a, b = t
    torch.manual_seed(0)
    x_d = torch.nn.functional.dropout(x, 0.1, training=True)
    return SpecLoRADelta.apply(x, x_d, v_k, u_k, sigma_k, mask, a, b, 2.0)


def tensors(shapes: list[tuple[int, ...]], trained: list[int], device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(shape, generator=g).to(device) for shape in shapes]
    return [t.requires_grad_() if i in trained else t for i, t in enumerate(out)]


def step(adapter: Adapter, t: list[torch.Tensor]) -> list[torch.Tensor]:
    out = adapter(t)
    return list(torch.autograd.grad(out.square().sum(), [x for x in t if x.requires_grad]))


def compare(fused: Adapter, composed: Adapter, t: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median ms of forward + backward for each, after checking they agree and 10 warm-up rounds."""
    for ours, reference in zip(step(fused, t), step(composed, t), strict=True):  # float32 rounding apart
        error = float((ours - reference).norm() / reference.norm())
        assert error < 1e-5, f"the fused path's gradient differs by {error:.2e} (relative norm)"
    device = t[0].device
    times: dict[str, list[float]] = {"function": [], "composed": []}
    for _ in range(10):
        step(fused, t), step(composed, t)
    for _ in range(repeats):
        for name, adapter in (("function", fused), ("composed", composed)):
            sync(device)
            start = time.perf_counter()
            step(adapter, t)
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"{name}_ms": round(1000 * value, 4) for name, value in medians.items()},
        "function_over_composed": round(medians["function"] / medians["composed"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="N: batch x sequence length")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/adapter_functions.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, d = args.tokens, 384
    lorsa = tensors([(n, d), (d, 112), (d, 112), (64,), (64,), (48, 64), (48, 64)], [0, 4, 5, 6], device)
    speclora = tensors([(n, d), (d, 32), (d, 32), (32,), (32,), (8, d), (d, 8)], [0, 4, 5, 6], device)
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": args.threads,
        "tokens": args.tokens,
        "lorsa": compare(lambda t: LoRSADelta.apply(*t), lorsa_composed, lorsa, args.repeats),
        "speclora": compare(speclora_fused, speclora_composed, speclora, args.repeats),
    }
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""torch.compile (and prepacked oneDNN weights) for the stages other than synthesis.

    .venv/bin/python bench/compile_stages.py     # bf16 channels-last, 2 members, 2 threads

Times, best of 5 after warm-up (compile times printed separately):
* soft labels: BN-folded eval forwards of 512 images (8 trajectory steps), eager vs compiled,
  and with prepacked bf16 weights and fused ReLU / add+ReLU
  (``torch.ops.mkldnn._convolution_pointwise``, what inductor's freezing emits);
* noise adaptation: train-mode-BN forwards of 64 images without gradients, eager vs compiled;
* bi-level: one student forward + parameter gradient through ``functional_call`` (51 source
  and 13 validation images), eager vs compiled.
Quoted in docs/BENCHMARKS.md (sixth session: tried and dropped).
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedbicross_flwr.fedbicross.utils import batchnorm_folded
from fedbicross_flwr.model import build_resnet18
from _timing import best_ms as _best_ms  # bench/ is the script's folder, first on sys.path

torch.manual_seed(0)
CL = torch.channels_last
BF16 = torch.bfloat16
mkldnn = torch.ops.mkldnn


def best_ms(fn) -> float:
    return _best_ms(fn, reps=5)


def first_call_s(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def member() -> torch.nn.Module:
    model = build_resnet18(1, 10).train()
    with torch.no_grad():
        model(torch.randn(64, 1, 28, 28))
    return model.eval().requires_grad_(False).to(memory_format=CL)


class Prepacked:
    """A BN-folded torchvision ResNet-18 forward with prepacked bf16 conv weights."""

    def __init__(self, folded: torch.nn.Module) -> None:
        def pack(name):
            conv = folded.get_submodule(name)
            weight = conv.weight.detach().to(BF16).contiguous(memory_format=CL)
            args = (list(conv.padding), list(conv.stride), list(conv.dilation), 1)
            bias = None if conv.bias is None else conv.bias.detach().to(BF16)
            return mkldnn._reorder_convolution_weight(weight, *args, None), bias, args

        self.stem = pack("conv1")
        self.blocks = []
        for layer in (1, 2, 3, 4):
            for index in (0, 1):
                prefix = f"layer{layer}.{index}"
                try:
                    down = pack(f"{prefix}.downsample.0")
                except AttributeError:
                    down = None
                self.blocks.append((pack(f"{prefix}.conv1"), pack(f"{prefix}.conv2"), down))
        self.fc = (folded.fc.weight.to(BF16), folded.fc.bias.to(BF16))

    @staticmethod
    def conv(x, packed, attr="none"):
        weight, bias, args = packed
        return mkldnn._convolution_pointwise(x, weight, bias, *args, attr, [], "")

    def __call__(self, x):
        h = self.conv(x.to(BF16), self.stem, "relu")
        for conv1, conv2, down in self.blocks:
            identity = h if down is None else self.conv(h, down)
            weight, bias, args = conv2
            h = mkldnn._convolution_pointwise.binary(self.conv(h, conv1, "relu"), identity,
                                                     weight, bias, *args, "add", 1.0, "relu",
                                                     [], "")
        return F.linear(h.mean((2, 3)), *self.fc).float()


members = [member() for _ in range(2)]

# --- soft labels ---------------------------------------------------------------------------
folded = [batchnorm_folded(m) for m in members]
x512 = torch.randn(512, 1, 28, 28).contiguous(memory_format=CL)


def labels(models):
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        return [m(x512).float() for m in models]


compiled = [torch.compile(m) for m in folded]
print(f"soft labels: compile {first_call_s(lambda: labels(compiled)):.0f} s", flush=True)
packed = [Prepacked(m) for m in folded]
eager_ms, compiled_ms = best_ms(lambda: labels(folded)), best_ms(lambda: labels(compiled))
packed_ms = best_ms(lambda: [p(x512) for p in packed])
print(f"soft labels, 2 members x 512 images: eager {eager_ms:.0f} ms, compiled "
      f"{compiled_ms:.0f} ms, prepacked {packed_ms:.0f} ms", flush=True)

# --- noise adaptation ----------------------------------------------------------------------
adapting = [copy.deepcopy(m) for m in members]
for model in adapting:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
x64 = torch.randn(64, 1, 28, 28).contiguous(memory_format=CL)


def adapt(models):
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        for model in models:
            model(x64)


compiled = [torch.compile(m) for m in adapting]
print(f"noise adaptation: compile {first_call_s(lambda: adapt(compiled)):.0f} s", flush=True)
print(f"noise adaptation, 2 members x 64 images: eager {best_ms(lambda: adapt(adapting)):.0f} "
      f"ms, compiled {best_ms(lambda: adapt(compiled)):.0f} ms", flush=True)

# --- bi-level student step -----------------------------------------------------------------
student = build_resnet18(1, 10).train().to(memory_format=CL)
params = dict(student.named_parameters())
targets = torch.softmax(3 * torch.randn(51, 10), 1)


def forward(model, parameters, buffers, x):
    return functional_call(model, (parameters, buffers), (x,))


compiled_forward = torch.compile(forward)


def student_step(fn, x):
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    with torch.autocast("cpu", dtype=BF16):
        logits = fn(student, params, buffers, x)
    loss = F.kl_div(logits.float().log_softmax(1), targets[: len(x)], reduction="batchmean")
    return torch.autograd.grad(loss, list(params.values()))


for n in (51, 13):
    x = torch.randn(n, 1, 28, 28).contiguous(memory_format=CL)
    print(f"bi-level, {n} images: compile "
          f"{first_call_s(lambda: student_step(compiled_forward, x)):.0f} s", flush=True)
    print(f"bi-level student forward + gradient, {n} images: eager "
          f"{best_ms(lambda: student_step(forward, x)):.0f} ms, compiled "
          f"{best_ms(lambda: student_step(compiled_forward, x)):.0f} ms", flush=True)

"""Where a student's training step spends its time on this machine: torch.profiler over forward + backward,
the convolutions' backward split by kind (depthwise or not) and by the size of their input map.

On a CPU, small images make the last stages of a mobilenet run on 1x1 and 2x2 maps, where a convolution's
backward costs far more than its arithmetic; this script shows how much of the step that is.

Run:  python benchmarks/step_profile.py [--arch mobilenet_v2] [--width-mult 0.5] [--small-input]
          [--image-size 32] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from compress_edge.models.resolve import create_model


def conv_backward_kind(shapes: list) -> str:
    """'depthwise, map <= 2 px', 'depthwise, larger maps' or 'other convolutions' from the op's input shapes."""
    inp, weight = shapes[1], shapes[2]  # after the output's gradient
    depthwise = len(weight) == 4 and weight[1] == 1 and weight[0] > 1
    small = len(inp) == 4 and max(inp[2], inp[3]) <= 2
    if not depthwise:
        return "other convolutions"
    return "depthwise, map <= 2 px" if small else "depthwise, larger maps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--width-mult", type=float, help="mobilenet_v2's width (the demo's student: 0.5).")
    parser.add_argument("--small-input", action="store_true", help="The stem for small images (stride 1).")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {} if args.width_mult is None else {"width_mult": args.width_mult}
    model = create_model(args.arch, small_input=args.small_input, **kwargs)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    for _ in range(3):  # warm-up: oneDNN builds its kernels on the first calls
        model(x).sum().backward()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            model(x).sum().backward()
    wall = (time.perf_counter() - started) / args.steps

    groups: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        if event.key == "aten::convolution_backward":
            groups["backward: " + conv_backward_kind(event.input_shapes)] += event.self_cpu_time_total
        elif event.key in ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"):
            groups["forward: convolutions"] += event.self_cpu_time_total
        elif "batch_norm" in event.key:
            groups["batch norm, both ways"] += event.self_cpu_time_total
    groups["everything else"] = total - sum(groups.values())
    stem = "small-input" if args.small_input else "ImageNet"
    width = "" if args.width_mult is None else f" x{args.width_mult:g}"
    print(f"{args.arch}{width} ({stem} stem) at {args.image_size} px, batch {args.batch_size}, {args.threads} threads: forward + "
          f"backward {1000 * wall:.0f} ms a step (profiled)")
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {100 * us / total:5.1f} %")


if __name__ == "__main__":
    main()

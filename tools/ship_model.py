#!/usr/bin/env python
"""
Turn a training checkpoint into shipped weights: the model's state dict alone (no optimizer
or scheduler state), floating tensors stored as float16 to halve the size. Keys are unchanged,
so the file loads into the plain and the Feature heads alike (DetectionCheckpointer casts back
to the model's dtype).

    python tools/ship_model.py output/shapes_mask_rcnn/model_final.pth \\
        d2_regionfeat/pretrained/shapes_mask_rcnn.pth
"""
import argparse
import os

import torch


def ship(checkpoint: str, output: str):
    """Write the float16 state dict of ``checkpoint`` (a detectron2 .pth) to ``output``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "model" not in state:
        raise ValueError(f"{checkpoint} is not a detectron2 training checkpoint (no 'model' key)")
    model = {
        k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save({"model": model, "iteration": state.get("iteration")}, output)
    print(f"Wrote {output}: {len(model)} tensors, {os.path.getsize(output) / 2**20:.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="model_final.pth of tools/train_net.py")
    parser.add_argument("output", help="where to write the shipped weights")
    args = parser.parse_args()
    ship(args.checkpoint, args.output)

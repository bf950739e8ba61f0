"""Grammar masks filled on threads (large batches) equal the ones filled one by one."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from vllm_blockdiff.engine.sampler import fill_masks
from vllm_blockdiff.grammar import BACKENDS, CanvasConstraint, GrammarSpec, bitmask, make_backend

TESTBED = Path(__file__).parent.parent / "examples" / "models" / "sdar-testbed"


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_threaded_masks_equal_serial_masks(backend_name):
    backend = make_backend(backend_name, str(TESTBED))
    schema = {"type": "object", "required": ["name", "n"],
              "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}
    text = ' {"name": "Gus", "n": 12}'
    constraints = []
    for k in range(80):  # each at a different point of the same output
        c = CanvasConstraint.create(backend, GrammarSpec(kind="json", source=json.dumps(schema)))
        c.accept(backend.encode(text)[: k % 12])
        constraints.append(c)
    with torch.inference_mode():  # as the model runner samples: the masks are inference tensors
        serial = bitmask.allocate(len(constraints), backend.vocab_size)
        threaded = bitmask.allocate(len(constraints), backend.vocab_size)
        fill_masks(constraints, serial)
        with ThreadPoolExecutor(4) as pool:
            fill_masks(constraints, threaded, pool)
    assert torch.equal(serial, threaded)
    assert len({tuple(row.tolist()) for row in serial}) > 3  # the rows really differ

"""Unmasking policies, selectable per request by name (`vllm_xargs={"policy": ...}`)."""

from vllm_blockdiff.policies import (
    bacd,
    dynamic,
    entropy,
    eoser,
    ete,
    factor,
    localleap,
    static,
    threshold,
)
from vllm_blockdiff.policies.base import Policy, PolicyInput

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        threshold.POLICY,
        dynamic.POLICY,
        static.POLICY,
        bacd.POLICY,
        localleap.POLICY,
        entropy.POLICY,
        factor.POLICY,
        ete.POLICY,
        eoser.POLICY,
    )
}

__all__ = ["POLICIES", "Policy", "PolicyInput"]

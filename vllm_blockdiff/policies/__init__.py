"""Unmasking policies, selectable per request by name (`vllm_xargs={"policy": ...}`)."""

from vllm_blockdiff.policies import (
    adablock,
    bacd,
    dynamic,
    entropy,
    eoser,
    ete,
    factor,
    freedave,
    learn2pd,
    localleap,
    static,
    subblock,
    tccf,
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
        freedave.POLICY,
        tccf.POLICY,
        adablock.POLICY,
        learn2pd.POLICY,
        subblock.POLICY,
    )
}

__all__ = ["POLICIES", "Policy", "PolicyInput"]

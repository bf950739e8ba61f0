"""Unmasking policies, selectable per request by name (`vllm_xargs={"policy": ...}`)."""

from vllm_blockdiff.policies import dynamic, static, threshold
from vllm_blockdiff.policies.base import Policy, PolicyInput

POLICIES: dict[str, Policy] = {p.name: p for p in (threshold.POLICY, dynamic.POLICY, static.POLICY)}

__all__ = ["POLICIES", "Policy", "PolicyInput"]

"""Per-architecture config hook: turns a plain `vllm serve <checkpoint>` into a diffusion serve.

Runs once in vLLM's config construction (`MODELS_CONFIG_MAP`). It resolves the block length and
the mask token from the checkpoint (or serve-time overrides), marks the model as a diffusion
model (`canvas_length`), selects the diffusion-aware scheduler (synchronous scheduling unless
`--async-scheduling` asks for windows: `engine/scheduler.py`), and records the result on the HF
config as `blockdiff`, where the frontend validator, the scheduler and the workers read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.config.diffusion import DiffusionConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_blockdiff.models import BY_ARCHITECTURE
from vllm_blockdiff.options import GrammarBackendName, ServeConfig, resolve_options
from vllm_blockdiff.policies import POLICIES, learn2pd

logger = init_logger(__name__)

SCHEDULER = "vllm_blockdiff.engine.scheduler.BlockDiffusionScheduler"
MASK_TOKEN_CANDIDATES = ("<|MASK|>", "<MASK>", "|<MASK>|", "<|mask|>", "[MASK]")
# vLLM's --structured-outputs-config.backend values the plugin can honour ("auto": its default).
VLLM_GRAMMAR_BACKENDS: dict[str, GrammarBackendName | None] = {
    "auto": None, "xgrammar": "xgrammar", "guidance": "llguidance"}


class ServeSettings(msgspec.Struct, forbid_unknown_fields=True):
    """`--additional-config '{"blockdiff": {...}}'`: serve-time overrides (all optional).

    Besides these keys, any parameter of a policy (e.g. "threshold", "steps") sets its default.
    """

    block_length: int | None = None
    max_block_length: int | None = None
    # Tokens of drafts per request and forward (FreeDave runs several drafts of a block).
    canvas_length: int | None = None
    policy: str | None = None
    mask_token_id: int | None = None
    # "auto", "xgrammar" or "llguidance"; default: vLLM's --structured-outputs-config.backend,
    # else "auto" (per request, whichever enforces the constraint exactly: grammar/auto.py)
    grammar_backend: GrammarBackendName | None = None
    # The sampler's CUDA graphs (ServeConfig.sampler_graphs): default on CUDA unless eager.
    sampler_graphs: bool | None = None


def _split_settings(raw: dict[str, Any]) -> tuple[ServeSettings, dict[str, Any]]:
    own = set(ServeSettings.__struct_fields__)
    policy_fields = {f for p in POLICIES.values() for f in p.params_cls.__struct_fields__}
    unknown = sorted(set(raw) - own - policy_fields)
    if unknown:
        raise ValueError(
            f"additional_config.blockdiff.{unknown[0]}: unknown setting; expected one of "
            f"{sorted(own | policy_fields)}"
        )
    try:
        settings = msgspec.convert({k: v for k, v in raw.items() if k in own}, ServeSettings)
    except msgspec.ValidationError as e:
        raise ValueError(f"additional_config.blockdiff: {e}") from None
    return settings, {k: v for k, v in raw.items() if k not in own}


def resolve_grammar_backend(settings: ServeSettings, vllm_config: VllmConfig
                            ) -> GrammarBackendName:
    """The serve setting, else vLLM's own backend option (`guidance` is llguidance), else
    "auto". The plugin enforces structured outputs itself (on the canvas), so a vLLM backend
    it has no canvas matcher for, or one that contradicts the setting, is refused."""
    vllm_name = vllm_config.structured_outputs_config.backend
    if vllm_name not in VLLM_GRAMMAR_BACKENDS:
        raise ValueError(f"--structured-outputs-config.backend {vllm_name}: block-diffusion models "
                         "support xgrammar and guidance (llguidance)")
    from_vllm = VLLM_GRAMMAR_BACKENDS[vllm_name]
    chosen = settings.grammar_backend
    if chosen is not None and from_vllm not in (None, chosen):
        raise ValueError(f"additional_config.blockdiff.grammar_backend ({chosen!r}) contradicts "
                         f"--structured-outputs-config.backend {vllm_name}")
    return chosen or from_vllm or "auto"


def load_tokenizer(vllm_config: VllmConfig) -> Any:
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    return AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                         trust_remote_code=mc.trust_remote_code)


def newline_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's one token for a newline (AdaBlock's default delimiter), if it has one."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def resolve_mask_token_id(vllm_config: VllmConfig, tokenizer: Any = None) -> int:
    """The mask token: config.json's `mask_token_id`, else the tokenizer's mask token."""
    hf_config = vllm_config.model_config.hf_config
    if getattr(hf_config, "mask_token_id", None) is not None:
        return int(hf_config.mask_token_id)
    tok = tokenizer if tokenizer is not None else load_tokenizer(vllm_config)
    vocab = tok.get_vocab()
    candidates = [tok.mask_token] if getattr(tok, "mask_token", None) else []
    for token in [*candidates, *MASK_TOKEN_CANDIDATES]:
        if token in vocab:
            return int(vocab[token])
    raise ValueError(
        "cannot find the mask token of this block-diffusion checkpoint (no `mask_token_id` in "
        "config.json, no mask token in the tokenizer); pass it with --additional-config "
        "'{\"blockdiff\": {\"mask_token_id\": ID}}'"
    )


class BlockDiffusionConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        family = BY_ARCHITECTURE[model_config.architecture]
        additional = vllm_config.additional_config
        raw = additional.get("blockdiff", {}) if isinstance(additional, dict) else {}
        settings, policy_defaults = _split_settings(raw)
        bundled_filter = Path(model_config.model) / learn2pd.DEFAULT_PATH  # Learn2PD's default
        if "filter" not in policy_defaults and bundled_filter.is_file():
            policy_defaults["filter"] = str(bundled_filter.resolve())
        tokenizer = None if model_config.skip_tokenizer_init else load_tokenizer(vllm_config)
        if "delimiter" not in policy_defaults and tokenizer is not None:
            # AdaBlock's default: a newline, where the tokenizer has one token for it.
            policy_defaults["delimiter"] = newline_token_id(tokenizer)

        checkpoint_block = next((getattr(hf_config, k) for k in family.block_length_keys
                                 if getattr(hf_config, k, None)), None)
        block_length = settings.block_length or checkpoint_block or family.default_block_length
        max_block_length = settings.max_block_length or max(block_length, 16)
        if block_length > max_block_length:
            raise ValueError(f"additional_config.blockdiff.block_length ({block_length}) exceeds "
                             f"max_block_length ({max_block_length})")
        # Asynchronous scheduling runs fixed windows of two blocks: they are draft tokens too.
        windows = bool(vllm_config.scheduler_config.async_scheduling)
        least = (2 if windows else 1) * max_block_length
        canvas_length = settings.canvas_length or least
        if canvas_length < least:
            raise ValueError(f"additional_config.blockdiff.canvas_length ({canvas_length}) is "
                             f"less than {'twice ' if windows else ''}max_block_length "
                             f"({max_block_length})")
        mask_token_id = (settings.mask_token_id if settings.mask_token_id is not None
                         else resolve_mask_token_id(vllm_config, tokenizer))

        serve = ServeConfig(
            block_length=block_length,
            max_block_length=max_block_length,
            mask_token_id=mask_token_id,
            policy=settings.policy or family.default_policy,
            policy_defaults=policy_defaults,
            block_length_divides=_prefix_cache_page(vllm_config, block_length),
            canvas_length=canvas_length,
            grammar_backend=resolve_grammar_backend(settings, vllm_config),
            vocab_size=model_config.get_vocab_size(),
            sampler_graphs=settings.sampler_graphs,
            shifted_logits=family.shifted_logits,
            windows=windows,
        )
        resolve_options(None, serve)  # the defaults themselves must be a valid request

        hf_config.blockdiff = msgspec.to_builtins(serve)
        hf_config.canvas_length = canvas_length  # vLLM's `is_diffusion` marker
        vllm_config.diffusion_config = DiffusionConfig(canvas_length=canvas_length)

        sched = vllm_config.scheduler_config
        if sched.scheduler_cls not in (None, SCHEDULER):
            raise ValueError(f"{family.architecture} needs the block-diffusion scheduler; "
                             f"remove --scheduler-cls {sched.scheduler_cls}")
        sched.scheduler_cls = SCHEDULER
        sched.async_scheduling = windows  # off unless asked for: windows cost 2B query tokens
        use_full_cuda_graphs(vllm_config, block_length)
        logger.info("block diffusion: block_length=%d (max %d), mask token %d, policy %s, "
                    "structured outputs by %s", block_length, max_block_length, mask_token_id,
                    serve.policy, serve.grammar_backend)


MAX_FULL_GRAPH_TOKENS = 2048  # largest FULL graph the plugin asks for (capture time, memory)


def use_full_cuda_graphs(vllm_config: VllmConfig, block_length: int) -> None:
    """FULL CUDA graphs for every batch up to the largest capture size, unless the user chose.

    vLLM's default (FULL_AND_PIECEWISE) replays FULL graphs only for uniform decode batches of
    `canvas_length` tokens per request; a diffusion step is B or 2B tokens per request and
    mixes prefills, so it fell back to PIECEWISE graphs with the attention op run eagerly per
    layer, where the host dominated the step. The block-causal kernel's launch depends only on
    the padded token and request counts (`attention/triton_kernel.py`), so one FULL graph per
    capture size serves any mix of prefill chunks, denoising steps, commits and drafts.
    """
    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode is None:
        compilation.cudagraph_mode = CUDAGraphMode.FULL
    # FULL graphs up to 2B tokens per request (a commit fused with a denoising step): vLLM's
    # default stops at 512 tokens, and larger diffusion steps then ran with no graph at all
    # (H100, 1.7B shape: 27.7 ms per 1,024-token step against 11.8 ms per 512-token step).
    if compilation.max_cudagraph_capture_size is None and \
            compilation.cudagraph_capture_sizes is None:
        tokens = 2 * block_length * vllm_config.scheduler_config.max_num_seqs
        compilation.max_cudagraph_capture_size = min(max(tokens, 512), MAX_FULL_GRAPH_TOKENS)


def _prefix_cache_page(vllm_config: VllmConfig, block_length: int) -> int:
    """KV page size that block lengths must divide for prefix caching to stay exact (0: none).

    A cached page must hold only final KV, and block-causal KV depends on the whole block, so
    blocks must not straddle page boundaries.
    """
    cache = vllm_config.cache_config
    if not cache.enable_prefix_caching:
        return 0
    page = cache.block_size or cache.DEFAULT_BLOCK_SIZE
    if page % block_length == 0:
        return page
    if not cache.user_specified_block_size:
        cache.block_size = -(-block_length // 16) * 16
        return cache.block_size
    logger.warning("block length %d does not divide --block-size %d: prefix caching disabled",
                   block_length, page)
    cache.enable_prefix_caching = False
    return 0

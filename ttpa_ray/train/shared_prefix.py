"""Shared-prefix DPO forward: a token-level pair's common part is computed once, not twice.

A TPS pair's chosen and rejected completions branch from one reference trajectory: they share the prompt
(often hundreds of tokens of tools and dialogue) and the completion up to the branch point, and differ
after it by a few tokens. TRL's DPO forward runs the batch ``[chosen rows; rejected rows]``, so every
shared token goes through the model twice. Here each pair becomes one packed row

    [shared + chosen suffix | last shared token + rejected suffix | padding]

where the second segment's position ids restart at the last shared token's position and a 4D attention
mask lets it see the shared tokens before it and itself, never the chosen suffix. Every position then
computes exactly what it computes in the standard forward (same token, same position, same keys), so
per-token log-probs are the standard ones: the shared positions serve both completions, and the last
shared token is repeated once so that each position predicts one label (it predicts the chosen suffix's
first token in the first segment and the rejected suffix's first token in the second). The shared part is
read from the collated rows themselves (their longest common prefix), so TRL's tokenisation, prompt split
and ``max_length`` truncation apply unchanged.

:class:`SharedPrefixForward` stands in for the model inside TRL's loss: called as TRL calls the model
(``model(input_ids, attention_mask, labels, fused_lm_head=True)``), it runs the packed rows through the
same model call (so DeepSpeed's ZeRO-3 hooks, autocast and TRL's fused LM head all apply) and gives back
TRL's output in the standard ``[2 x pairs, length - 1]`` layout. Everything after the forward (loss
types, reference log-probs, rewards, metrics) is TRL's own code on those tensors. Calls it cannot pack
exactly (other inputs, left padding, a sliding-window or non-SDPA/eager attention, MoE router losses,
prompt-learning adapters) go to the model unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

IGNORE = -100  # TRL's label for a position that is not scored
# what TRL's DPO forward passes; anything else (images, router logits) is left to the standard forward
_PACKABLE_KWARGS = frozenset({"input_ids", "attention_mask", "labels", "fused_lm_head", "use_cache"})
_MASKED_ATTENTION = frozenset({"sdpa", "eager"})  # implementations that take an arbitrary 4D mask


@dataclass(frozen=True)
class PackedPairs:
    """One row per pair: the shared part and both suffixes, and how to read the standard layout back.

    ``attention_mask`` is True where a query position may attend to a key position. ``source[r, t]`` is
    the flat index (into ``pairs x packed_length``) of the packed position whose next-token score is the
    standard row ``r``'s score at shifted position ``t``; ``scored`` is where the standard forward has a
    label (elsewhere its outputs are zero).
    """

    input_ids: torch.Tensor  # [pairs, T]
    position_ids: torch.Tensor  # [pairs, T]
    attention_mask: torch.Tensor  # [pairs, 1, T, T] bool
    shift_labels: torch.Tensor  # [pairs, T]: the token each position is scored on, or IGNORE
    source: torch.Tensor  # [2 * pairs, L - 1]
    scored: torch.Tensor  # [2 * pairs, L - 1] bool
    standard_tokens: int  # tokens of the standard batch (both rows of every pair, no padding)
    packed_tokens: int  # tokens of the packed rows (no padding)

    def unpack(self, packed: torch.Tensor | None) -> torch.Tensor | None:
        """A per-position output of the packed rows ([pairs, T]) in the standard layout ([2 x pairs, L-1]),
        zero where the standard forward scores nothing; shared positions feed both rows (and their
        gradients add up)."""
        if packed is None:
            return None
        values = packed.reshape(-1)[self.source]
        return values & self.scored if values.dtype == torch.bool else torch.where(self.scored, values, 0)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention mask as eager attention adds it: 0 where attended, the dtype's minimum elsewhere."""
        blocked = torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device)
        return blocked.masked_fill(~self.attention_mask, torch.finfo(dtype).min)


def shared_prefix_lengths(input_ids: torch.Tensor, lengths: torch.Tensor, pairs: int) -> torch.Tensor:
    """Tokens each pair's chosen row (``input_ids[i]``) and rejected row (``input_ids[pairs + i]``) share
    from the start: the prompt plus the completions' common prefix."""
    chosen, rejected = input_ids[:pairs], input_ids[pairs:]
    inside = torch.arange(input_ids.shape[1], device=input_ids.device) < torch.minimum(
        lengths[:pairs], lengths[pairs:]
    ).unsqueeze(1)
    agree = (chosen == rejected) & inside
    return agree.long().cumprod(dim=1).sum(dim=1)


def rejected_segment(rejected_len: int, shared: int) -> tuple[int, int]:
    """(first position, length) of the rejected row's part that a packed row holds: from the last shared
    token on (the rejected positions before it are the chosen row's), or nothing when the rejected row
    ends within the shared part."""
    start = max(shared - 1, 0)
    return start, (rejected_len - start if shared < rejected_len else 0)


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_token_id: int = 0
) -> PackedPairs | None:
    """Pack TRL's concatenated DPO batch (chosen rows, then rejected rows, right-padded; ``labels`` the
    tokens with IGNORE where TRL does not score them) into one row per pair; None when it is not that."""
    rows, width = input_ids.shape
    if rows % 2 or width < 2 or labels.shape != input_ids.shape:
        return None
    device = input_ids.device
    lengths = attention_mask.sum(dim=1)
    if int(lengths.min()) < 1:
        return None
    if not torch.equal(attention_mask.bool(), torch.arange(width, device=device) < lengths.unsqueeze(1)):
        return None  # not right-padded: TRL's collator always is; anything else takes the standard way
    pairs = rows // 2
    scored = labels[:, 1:] != IGNORE
    shared_of = shared_prefix_lengths(input_ids, lengths, pairs).tolist()
    length_of = lengths.tolist()

    # per pair: the chosen row whole, then the rejected row's segment
    layout = []
    for i in range(pairs):
        chosen_len, rejected_len, shared = length_of[i], length_of[pairs + i], shared_of[i]
        layout.append((chosen_len, rejected_len, shared, *rejected_segment(rejected_len, shared)))
    packed_len = max(c + s for c, _, _, _, s in layout)

    ids = torch.full((pairs, packed_len), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros((pairs, packed_len), dtype=torch.long, device=device)
    segment_of = torch.full((pairs, packed_len), -1, dtype=torch.long, device=device)  # 0, 1, -1: pad
    shift_labels = torch.full((pairs, packed_len), IGNORE, dtype=input_ids.dtype, device=device)
    segment_start = torch.zeros((pairs, 1, 1), dtype=torch.long, device=device)
    steps = torch.arange(width - 1, device=device)
    source = torch.empty((rows, width - 1), dtype=torch.long, device=device)
    for i, (chosen_len, rejected_len, shared, start, segment) in enumerate(layout):
        chosen, rejected = input_ids[i], input_ids[pairs + i]
        ids[i, :chosen_len] = chosen[:chosen_len]
        positions[i, :chosen_len] = torch.arange(chosen_len, device=device)
        segment_of[i, :chosen_len] = 0
        # a position of the first segment is scored when the chosen row scores it, or, within the shared
        # part (same token, same next token), when the rejected row does
        before = chosen_len - 1
        wanted = scored[i, :before] | (scored[pairs + i, :before] & (steps[:before] < shared - 1))
        shift_labels[i, :before] = torch.where(wanted, chosen[1:chosen_len], IGNORE)
        if segment:
            end = chosen_len + segment
            ids[i, chosen_len:end] = rejected[start:rejected_len]
            positions[i, chosen_len:end] = torch.arange(start, rejected_len, device=device)
            segment_of[i, chosen_len:end] = 1
            segment_start[i] = start
            shift_labels[i, chosen_len : end - 1] = torch.where(
                scored[pairs + i, start : rejected_len - 1], rejected[start + 1 : rejected_len], IGNORE
            )
        # where the standard layout reads each row's scores from (clamped: unscored places read anything)
        base = i * packed_len
        source[i] = base + steps.clamp(max=packed_len - 1)
        from_segment = (chosen_len + steps - start).clamp(max=packed_len - 1)
        source[pairs + i] = base + torch.where(steps < shared - 1, steps, from_segment)

    keys = torch.arange(packed_len, device=device)
    causal = keys.unsqueeze(0) <= keys.unsqueeze(1)  # [query, key]
    query_segment, key_segment = segment_of.unsqueeze(2), segment_of.unsqueeze(1)
    same_segment = (query_segment == key_segment) & (key_segment >= 0) & causal
    # the rejected segment sees the shared tokens before its first one (chosen-part index = position)
    shared_keys = (query_segment == 1) & (key_segment == 0) & (keys.view(1, 1, -1) < segment_start)
    padding = (query_segment < 0) & torch.eye(packed_len, dtype=torch.bool, device=device)  # no empty row
    return PackedPairs(
        input_ids=ids,
        position_ids=positions,
        attention_mask=(same_segment | shared_keys | padding).unsqueeze(1),
        shift_labels=shift_labels,
        source=source,
        scored=scored,
        standard_tokens=int(lengths.sum()),
        packed_tokens=sum(c + s for c, _, _, _, s in layout),
    )


class PackCache:
    """The packing of the batch in hand, made once for the policy and the live reference forward."""

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, ...] = ()
        self._packed: PackedPairs | None = None

    def pack(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> PackedPairs | None:
        """:func:`pack_pairs` of these tensors, reused when called again with the same tensor objects."""
        key = (input_ids, attention_mask, labels)
        if len(self._key) != len(key) or any(a is not b for a, b in zip(self._key, key, strict=True)):
            self._key, self._packed = key, pack_pairs(input_ids, attention_mask, labels)
        return self._packed


def model_config(model: Any) -> Any:
    """The transformers config of a model, through DeepSpeed / DDP wrappers (``.module``); None if none."""
    from transformers import PretrainedConfig

    for _ in range(4):
        config = getattr(model, "config", None)
        if isinstance(config, PretrainedConfig):
            return config
        model = getattr(model, "module", None)
        if model is None:
            break
    return None


def packable_model(model: Any) -> bool:
    """Whether the packed forward is exact for this model: an attention that takes a custom 4D mask, no
    sliding-window layers (a custom mask would replace their window), no virtual prompt tokens."""
    config = model_config(model)
    if config is None:
        return False
    config = config.get_text_config()
    if getattr(config, "_attn_implementation", None) not in _MASKED_ATTENTION:
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    peft = getattr(model, "active_peft_config", None) or getattr(
        getattr(model, "module", None), "active_peft_config", None
    )
    return not getattr(peft, "is_prompt_learning", False)


@contextlib.contextmanager
def _scored_positions_only() -> Iterator[None]:
    # TRL's fused LM head projects only the labelled positions on Triton devices and every position
    # elsewhere (to spare Neuron recompilations); a packed row is mostly prompt, so ask for the former.
    # It is the same computation on fewer rows: the per-position results are identical.
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_use_triton"):
        yield
        return
    with mock.patch.object(trl_utils, "_use_triton", lambda device: True):
        yield


class SharedPrefixForward:
    """A model as TRL's DPO forward calls it, computing each pair's shared part once (see the module
    docstring); calls it cannot pack exactly go to the model as they are."""

    def __init__(self, model: Any, cache: PackCache | None = None) -> None:
        self.model = model
        self.cache = cache or PackCache()
        self.packable = packable_model(model)
        self.last: PackedPairs | None = None  # the packing of the last packed call (for the bench's log)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if args or not self.packable or not kwargs.get("fused_lm_head") or labels is None:
            return self.model(*args, **kwargs)
        if not set(kwargs) <= _PACKABLE_KWARGS or kwargs.get("attention_mask") is None:
            return self.model(*args, **kwargs)
        packed = self.cache.pack(kwargs["input_ids"], kwargs["attention_mask"], labels)
        if packed is None:
            return self.model(*args, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        config = model_config(self.model).get_text_config()
        mask = packed.attention_mask
        if config._attn_implementation == "eager":
            mask = packed.additive_mask(torch.float32)
        with _scored_positions_only():
            out = self.model(
                input_ids=packed.input_ids,
                attention_mask=mask,
                position_ids=packed.position_ids,
                shift_labels=packed.shift_labels,
                fused_lm_head=True,
                use_cache=False,
            )
        self.last = packed
        log_probs = packed.unpack(out.log_probs)
        assert log_probs is not None
        label_mask = packed.scored
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / label_mask.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=packed.unpack(out.entropy),
            log_sum_sq_probs=packed.unpack(out.log_sum_sq_probs),
            mean_logits=packed.unpack(out.mean_logits),
            is_top1=packed.unpack(out.is_top1),
            label_mask=label_mask,
        )

"""``pretrain``: plain causal-LM training on raw text; every token after the first is a target."""

from __future__ import annotations

from posttrain.stages.sft import TEXT_FORMATS, TokenLMStage


def pretrain_stage() -> TokenLMStage:
    return TokenLMStage(TEXT_FORMATS, loss_on="all")

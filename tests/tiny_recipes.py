"""The start of the small recipes the stage tests run: a tiny Llama-style model (hidden 32, 2
layers) SFT-trained for one epoch on demo-world rows, which the stage under test starts from."""

TINY_MODEL = "{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}"


def tiny_sft_base(recipe: str, *, n: int, lr: str = "1e-3", batch: int = 16, stage: str = "base") -> str:
    """``name: recipe``, seed 0, and the first stage: SFT on ``n`` demo rows, ``batch`` rows a step.
    Append the stages under test (indented by two spaces)."""
    return (f"name: {recipe}\nseed: 0\nstages:\n  {stage}:\n    kind: sft\n    model:\n"
            f"      tokenizer: builtin:demo\n      tiny: {TINY_MODEL}\n"
            f"    data: {{builtin: demo.sft, args: {{n: {n}}}}}\n"
            f"    train: {{lr: {lr}, global_batch_size: {batch}, micro_batch_size: {batch}, max_length: 96, "
            "checkpoint_every: 0}\n")

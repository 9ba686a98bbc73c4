"""Training a model to read explicit memory (docs/design.md, "Training a model to read memory"): three recipes and their parts.

- `warmup.run_warmup(WarmupConfig, out)`: stage 1, next-token training without memory.
- `continual.prepare_continual(...)` then `continual.run_continual(ContinualConfig, out)`: stage 2,
  each 64-token chunk reads its own reference and those of the previous 4 chunks, references encoded
  on the fly by the model being trained.
- `sft.run_sft(SFTConfig, out)`: chat questions reading 5 memories (the gold one among them),
  answer-only loss, with RAG and general-text samples in the mix; optional curriculum of stages.
- `adapters.save_adapter(...)`: a trained LoRA adapter with the config and command that made it
  (`memory3.checkpoint.load_trained` loads one merged into its base model).
- `probe.probe(model, tokenizer)`: quick held-out accuracy in memory / none / RAG modes.

Command line: `memory3 train warmup|continual|sft|pair|probe` (train/cli.py); configs in
configs/train/. Importing this package does nothing.
"""

"""Models: the base model and its LoRA and LoRA-SB copies, peft's bridge to the core, generation."""

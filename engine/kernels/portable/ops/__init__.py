"""Device-agnostic kernel implementations in plain PyTorch (registered as ``torch.library`` operators)."""

"""fedsec_example: a Flower / PyTorch app that adopts fedsec's defenses part by part."""

"""The fedsec ClientApp and its helpers."""

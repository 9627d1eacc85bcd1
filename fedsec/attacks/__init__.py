"""Attacks: data poisoning, model poisoning and evasion."""

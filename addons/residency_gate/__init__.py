"""residency-gate: keep LLM API traffic inside the places an organisation has promised."""

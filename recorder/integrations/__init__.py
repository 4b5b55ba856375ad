"""Framework integrations: each module imports its framework (Lightning, Hugging Face
transformers) itself, so `import recorder` never needs them. Install with the extras
`pip install dynascope[lightning]` / `dynascope[hf]`; see docs/SEQUENCES.md."""

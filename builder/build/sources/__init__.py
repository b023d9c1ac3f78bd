"""Model sources: turn what the user points at (HF directory, GGUF file, embedded default)
into one checked Hugging Face layout the engine builders can read."""

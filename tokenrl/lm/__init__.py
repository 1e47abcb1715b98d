"""Language models: transformers adapters (hub id, directory, GGUF), the student's Q heads, the generation engine and memory-flat scoring."""

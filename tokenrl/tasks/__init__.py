"""Tasks: a teacher with its prompts, references and samplers (synthetic or transformers), and the offline teacher data they generate."""

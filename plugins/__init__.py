"""Entry-point modules that hook the plugin into vLLM and Triton (see pyproject.toml)."""

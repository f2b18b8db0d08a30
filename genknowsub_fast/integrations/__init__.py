"""Integrations with other libraries (vLLM, ...). Nothing here is imported by the core package."""

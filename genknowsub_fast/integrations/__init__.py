"""Integrations with other frameworks (lm-eval). Nothing in the core imports these modules."""

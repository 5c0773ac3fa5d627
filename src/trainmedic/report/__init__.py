"""Renderers for check results: terminal, JSON, Markdown, JUnit XML and self-contained HTML."""

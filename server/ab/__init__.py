"""A/B experiments: offline (a question set through several arms) and online (splits)."""

"""One module per pipeline stage: each takes its config and the store and returns its artifact."""

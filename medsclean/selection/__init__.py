"""Per-class decisions: Step 3's progressive selection and the final cut rules."""

"""The self-contained HTML pages: the review page of a run and the evaluation report."""

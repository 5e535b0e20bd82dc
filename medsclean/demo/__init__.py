"""Generated demo data: synthetic classes with painted defects, contaminated copies of a dataset."""

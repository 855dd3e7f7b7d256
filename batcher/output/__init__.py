"""What a run leaves for people and programs: the dataset (images + metadata.parquet) and the morning report."""

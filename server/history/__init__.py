"""The history path: the recorder stores the tickerplant log as Parquet; queries read it back."""

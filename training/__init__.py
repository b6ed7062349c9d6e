"""ozon-cancel-risk: ingestion, features, labels and training of the cancellation-risk model."""

__version__ = "0.1.0"

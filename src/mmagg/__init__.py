"""mmagg: the Model Monitoring Inference Aggregator."""

__version__ = "0.1.0"
__all__ = ["__version__"]

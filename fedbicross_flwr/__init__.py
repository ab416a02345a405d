"""fedbicross-flwr: FedBiCross (personalized, data-free, one-shot FL) as a Flower app."""

__version__ = "0.1.0"

"""FedBiCross ClientApp (thin Flower glue over fedbicross_flwr.client)."""

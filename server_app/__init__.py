"""FedBiCross ServerApp (thin Flower glue over fedbicross_flwr.server)."""

"""The coordinator: source pretraining, the Flower ServerApp and aggregation of encoder updates."""

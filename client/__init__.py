"""What runs inside a bank: the Flower ClientApp, DP training, private head and budget."""

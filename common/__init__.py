"""What the bank side and the server side share: data, schema, model, privacy accounting.

Nothing here talks to the network.
"""

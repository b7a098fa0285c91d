"""simple-ipaas: the gRPC core."""
__version__ = "0.1.0"
